"""Tests never reach a model hub (without HF_HUB_OFFLINE each hub lookup waits ~23 s before failing), and never
write graphflow's own caches into the user's home."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["GRAPHFLOW_CACHE_HOME"] = tempfile.mkdtemp(prefix="graphflow-test-cache-home-")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight models `graphflow make-tiny-models` writes, built once per test session."""
    from graphflow.models.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))

# The Ray tests need a loopback-only network namespace (../shared/NOTES.md): tests/graphflow/test_ray_namespace.py
# runs them there, in their own pytest; a plain `pytest` does not collect them itself.
collect_ignore = [] if os.environ.get("GRAPHFLOW_RAY_NAMESPACE") == "1" else ["ray"]
