"""The results store: images by content, 8-bit PNGs, a summary naming them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from graphflow.engine import Engine
from graphflow.service.results import ResultStore


def test_image_outputs_and_saved_files_are_stored_by_content_with_a_summary(tmp_path: Path) -> None:
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    Image.fromarray(pixels).save(tmp_path / "in.png")
    document = {"graphflow": 1, "nodes": {
        "load": {"type": "LoadImage", "inputs": {"path": "in.png"}},
        "save": {"type": "SaveImage", "inputs": {"image": {"from": "load.image"}, "prefix": "out"}},
        "n": {"type": "Int", "inputs": {"value": 7}}},
        "outputs": {"image": "load.image", "seven": "n.value"}}
    engine = Engine(input_dirs=[tmp_path], output_dir=tmp_path / "out")
    result = engine.run(document)
    store = ResultStore(tmp_path / "results")
    summary = store.summary(store.store_run(result, {"image": "IMAGE", "seven": "INT"}))
    assert summary is not None
    [image] = summary["outputs"]["image"]["files"]
    assert summary["outputs"]["seven"] == {"type": "INT", "value": 7}
    assert set(summary["ran"]) == {"load", "save", "n"} and summary["cached"] == []
    path = store.path(image)
    assert path is not None
    with Image.open(path) as stored:
        assert stored.mode == "RGB" and np.array_equal(np.asarray(stored), pixels)
    assert len(summary["written"]) == 1 and summary["files"][0] == image
    assert json.loads((tmp_path / "results" / store.store_run(result, {"image": "IMAGE"})).read_text())["ran"]


def test_names_that_are_not_stored_digests_name_no_file(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "results")
    name = store.put(b"x", "png")
    assert store.path(name) is not None
    assert store.path("../" + name) is None and store.path(name.upper()) is None and store.path("a" * 64 + ".png") \
        is None
