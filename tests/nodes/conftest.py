"""A RunContext whose input root is tmp_path/"in" and output root tmp_path/"out", so tmp_path itself is outside."""

from pathlib import Path

import pytest

from graphflow.context import RunContext
from graphflow.events import CancelToken
from graphflow.paths import PathPolicy


@pytest.fixture
def input_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "in"
    directory.mkdir()
    return directory


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture
def ctx(input_dir: Path, output_dir: Path) -> RunContext:
    return RunContext(node="n", type="Test", paths=PathPolicy.create([input_dir], output_dir), cancel=CancelToken())
