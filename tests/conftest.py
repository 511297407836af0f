"""Tests never reach a model hub: without this each hub lookup waits ~23 s before failing."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight models `graphflow make-tiny-models` writes, built once per test session."""
    from graphflow.models.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))
