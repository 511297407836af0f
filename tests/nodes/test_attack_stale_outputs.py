"""Attacks on cached output nodes: a SaveImage result reused from cache must still describe the file on disk, and
the file must be what a fresh Engine would have written for this document."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from graphflow import Engine


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(inputs / "a.png")
    return inputs, outputs


def saving(description: str = "first", save_id: str = "save") -> dict[str, Any]:
    return {"graphflow": 1, "name": "s", "description": description, "nodes": {
        "photo": {"type": "LoadImage", "inputs": {"path": "a.png"}},
        save_id: {"type": "SaveImage", "inputs": {"image": {"from": "photo.image"}, "prefix": "r"}},
    }, "outputs": {}}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_a_deleted_output_file_is_written_again(folders: tuple[Path, Path]) -> None:
    """Resisted: the cached result names a file that is gone, so SaveImage runs again."""
    inputs, outputs = folders
    engine = Engine(input_dirs=[inputs], output_dir=outputs)
    [written] = engine.run(saving()).files
    written.unlink()
    again = engine.run(saving())
    assert again.ran == ["save"] and len(again.files) == 1 and again.files[0].is_file()


def test_an_output_file_replaced_by_another_image_is_not_taken_for_this_graphs_output(
        folders: tuple[Path, Path]) -> None:
    inputs, outputs = folders
    engine = Engine(input_dirs=[inputs], output_dir=outputs)
    [written] = engine.run(saving()).files
    expected = pixels(written)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(outputs / "other.png")
    os.replace(outputs / "other.png", written)  # the user (or another tool) put another picture there

    again = engine.run(saving())
    assert again.ran == ["save"]  # a fresh engine would write the graph's image; so must this one
    assert [np.array_equal(pixels(path), expected) for path in again.files] == [True]


def test_an_edited_document_does_not_reuse_a_png_that_embeds_the_old_one(folders: tuple[Path, Path]) -> None:
    inputs, outputs = folders
    engine = Engine(input_dirs=[inputs], output_dir=outputs)
    engine.run(saving())

    edited = saving(description="second", save_id="out")
    result = engine.run(copy.deepcopy(edited))
    oracle = Engine(input_dirs=[inputs], output_dir=outputs.parent / "fresh").run(copy.deepcopy(edited))

    [fresh_file] = oracle.files
    assert Image.open(fresh_file).text["graphflow"].count('"second"') == 1
    assert result.ran == ["out"] and Image.open(result.files[0]).text["graphflow"] == \
        Image.open(fresh_file).text["graphflow"]
