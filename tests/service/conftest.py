"""One `graphflow serve` subprocess for the API, page and restart tests of this folder (started once: it costs
a few seconds of imports and model loads)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.server import Server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("serve"), tiny_models, "--max-image-pixels", "100000",
                     "--cors-origin", "http://allowed.example").start()
    yield running
    running.stop()
