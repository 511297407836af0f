"""graphs/preprocess_maps.json: one photo's edge, depth and line maps saved side by side, offline on a tiny DPT."""

from __future__ import annotations

from pathlib import Path

import torch

from graphflow import Engine
from graphflow.models import ModelManager
from graphflow.models.tiny_depth import write_tiny_dpt

ROOT = Path(__file__).resolve().parents[2]
GRAPH = ROOT / "graphs" / "preprocess_maps.json"


def test_preprocess_maps_puts_photo_edges_depth_and_lines_side_by_side(tmp_path: Path) -> None:
    dpt = write_tiny_dpt(tmp_path / "dpt")
    engine = Engine(input_dirs=[ROOT, tmp_path], output_dir=tmp_path / "out", models=ModelManager())

    result = engine.run(GRAPH, {"depth_model": str(dpt)})

    maps = result.outputs["maps"]
    assert maps.shape == (1, 96, 512, 3)
    for index, name in enumerate(("edges", "depth", "lines"), start=1):
        panel = maps[:, :, 128 * index:128 * (index + 1)]
        assert torch.equal(panel, result.outputs[name]) and panel.std() > 0
    assert [path.name for path in result.files] == ["preprocess_maps_00000.png"]
    again = engine.run(GRAPH, {"depth_model": str(dpt), "sigma": 0.5})
    assert "edges" in again.ran and not {"depth", "lines"} & set(again.ran)
