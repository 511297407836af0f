"""Preprocessors are computed once: downstream changes reuse them, and the disk tier keeps them across engines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from graphflow import Engine
from graphflow.models import ModelManager
from graphflow.models.tiny_depth import write_tiny_dpt

PREPROCESSORS = {"edges", "depth", "lines"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a photo and a tiny DPT."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("inputs")
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[16:48, 20:44] = (220, 180, 40)
    Image.fromarray(pixels).save(folder / "photo.png")
    write_tiny_dpt(folder / "dpt")
    return folder


def preprocessors() -> dict:
    return {
        "photo": {"type": "LoadImage", "inputs": {"path": "photo.png"}},
        "edges": {"type": "Canny", "inputs": {"image": {"from": "photo.image"}, "thresholds": "adaptive"}},
        "depth": {"type": "Depth", "inputs": {"image": {"from": "photo.image"}, "model": "dpt"}},
        "lines": {"type": "LineartStandard", "inputs": {"image": {"from": "photo.image"}, "detect_resolution": 64}},
    }


def controlled_render(tiny: Path) -> dict:
    """The preprocessors feeding two ControlNets of a tiny SD1.5 render whose prompt and seed are params."""
    positive = {"clip": {"from": "sd.clip"}, "text": {"param": "prompt"}}
    control = {name: {"type": "ControlApply", "inputs": {"controlnet": {"from": f"cn_{name}.controlnet"},
                                                        "image": {"from": f"{name}.image"}}}
               for name in ("edges", "depth")}
    return {"graphflow": 1, "params": {"prompt": {"type": "STRING", "default": "a room"},
                                       "seed": {"type": "INT", "default": 0}},
            "nodes": {
                **preprocessors(),
                "sd": {"type": "CheckpointLoader", "inputs": {"model": str(tiny / "sd15")}},
                "cn_edges": {"type": "ControlNetLoader", "inputs": {"model": str(tiny / "controlnet-canny")}},
                "cn_depth": {"type": "ControlNetLoader", "inputs": {"model": str(tiny / "controlnet-depth")}},
                "positive": {"type": "TextEncode", "inputs": positive},
                **{f"control_{name}": node for name, node in control.items()},
                "sample": {"type": "Sampler", "inputs": {
                    "model": {"from": "sd.model"}, "positive": {"from": "positive.conditioning"},
                    "control": [{"from": "control_edges.control"}, {"from": "control_depth.control"}],
                    "seed": {"param": "seed"}, "steps": 2, "width": 64, "height": 64}},
                "decode": {"type": "VAEDecode",
                           "inputs": {"vae": {"from": "sd.vae"}, "latent": {"from": "sample.latent"}}},
            },
            "outputs": {"image": "decode.image", "lines": "lines.image"}}


def test_changing_the_prompt_or_seed_never_reruns_a_preprocessor(inputs: Path, tiny_models: Path) -> None:
    engine = Engine(input_dirs=[inputs, tiny_models], models=ModelManager())
    graph = controlled_render(tiny_models)

    first = engine.run(graph)
    new_prompt = engine.run(graph, {"prompt": "a forest"})
    new_seed = engine.run(graph, {"prompt": "a forest", "seed": 1})

    assert set(first.ran) >= PREPROCESSORS
    assert "positive" in new_prompt.ran and "sample" in new_seed.ran and "positive" not in new_seed.ran
    for result in (new_prompt, new_seed):
        assert not PREPROCESSORS & set(result.ran)
        assert not torch.equal(result.outputs["image"], first.outputs["image"])
    assert sum(count for key, count in engine.models.loads.items() if key.kind == "depth") == 1


def test_the_disk_tier_keeps_preprocessor_maps_for_a_new_engine(inputs: Path, tmp_path: Path) -> None:
    graph = {"graphflow": 1, "nodes": preprocessors(),
             "outputs": {name: f"{name}.image" for name in sorted(PREPROCESSORS)}}
    first = Engine(input_dirs=[inputs], disk_cache=tmp_path / "cache", models=ModelManager()).run(graph)

    fresh = ModelManager()
    again = Engine(input_dirs=[inputs], disk_cache=tmp_path / "cache", models=fresh).run(graph)

    assert set(first.ran) >= PREPROCESSORS
    assert not PREPROCESSORS & set(again.ran) and set(again.cached) >= PREPROCESSORS
    assert not fresh.loads  # the depth model was never needed
    for name in PREPROCESSORS:
        assert torch.equal(again.outputs[name], first.outputs[name])


def test_the_device_option_is_part_of_a_model_preprocessors_key(inputs: Path, tmp_path: Path) -> None:
    graph = {"graphflow": 1, "nodes": preprocessors(), "outputs": {"depth": "depth.image", "edges": "edges.image"}}
    Engine(input_dirs=[inputs], disk_cache=tmp_path / "cache", models=ModelManager()).run(graph)

    other = Engine(input_dirs=[inputs], disk_cache=tmp_path / "cache", models=ModelManager(),
                   options={"device": "cpu", "dtype": "bf16"}).run(graph)

    assert "depth" in other.ran and "edges" in other.cached
