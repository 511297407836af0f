"""Paths that loop, escape or point nowhere are refused with a located error before anything runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from graphflow import Engine, ValidationError, default_registry
from graphflow.errors import GraphflowError
from graphflow.paths import PathError, PathPolicy


@pytest.fixture
def root(tmp_path: Path) -> Path:
    inside = tmp_path / "in"
    inside.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(inside / "photo.png")
    (tmp_path / "secret.png").write_bytes((inside / "photo.png").read_bytes())
    os.symlink("loop_b", inside / "loop_a")
    os.symlink("loop_a", inside / "loop_b")
    os.symlink(tmp_path / "secret.png", inside / "escape.png")
    os.symlink(tmp_path, inside / "up")
    return inside


def run(root: Path, nodes: dict[str, Any], outputs: dict[str, str] | None = None) -> Any:
    engine = Engine(default_registry(), input_dirs=[root], output_dir=root / "out")
    return engine.run({"graphflow": 1, "nodes": nodes, "outputs": outputs or {}})


@pytest.mark.parametrize(("path", "code"), [
    ("loop_a", "file_not_found"),
    ("loop_a/photo.png", "file_not_found"),
    ("escape.png", "path_outside_root"),
    ("up/secret.png", "path_outside_root"),
    ("../secret.png", "path_outside_root"),
    ("", "file_not_found"),
    (".", "file_not_found"),
    ("photo.png\x00", "file_not_found"),
])
def test_hostile_input_paths_are_refused_before_anything_runs(root: Path, path: str, code: str) -> None:
    with pytest.raises(ValidationError) as caught:
        run(root, {"photo": {"type": "LoadImage", "inputs": {"path": path}}}, {"image": "photo.image"})
    assert [(error.code, error.node, error.input) for error in caught.value.errors] == [(code, "photo", "path")]


@pytest.mark.parametrize("prefix", ["loop_a/x", "../x", "/tmp/x", "up_out/x"])
def test_hostile_output_prefixes_are_refused_before_anything_runs(root: Path, prefix: str) -> None:
    (root / "out").mkdir()
    os.symlink("loop_b", root / "out" / "loop_a")
    os.symlink("loop_a", root / "out" / "loop_b")
    os.symlink(root.parent, root / "out" / "up_out")
    with pytest.raises(ValidationError) as caught:
        run(root, {"photo": {"type": "LoadImage", "inputs": {"path": "photo.png"}},
                   "save": {"type": "SaveImage", "inputs": {"image": {"from": "photo.image"}, "prefix": prefix}}})
    assert [(error.code, error.node, error.input) for error in caught.value.errors] == \
        [("path_outside_root", "save", "prefix")]
    assert not list(root.parent.glob("x_*.png")) and not list((root / "out").rglob("*.png"))


def test_a_looping_input_or_output_directory_is_refused_by_name(root: Path) -> None:
    for make in (lambda: PathPolicy.create([root / "loop_a"]), lambda: PathPolicy.create([root], root / "loop_a")):
        with pytest.raises(PathError) as caught:
            make()
        assert "loop" in str(caught.value).lower() and isinstance(caught.value, GraphflowError)


def test_a_document_path_that_loops_is_a_validation_error(root: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        Engine(default_registry(), input_dirs=[root]).run(root / "loop_a")
    assert caught.value.codes == ["file_not_found"]
