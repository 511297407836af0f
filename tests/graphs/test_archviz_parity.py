"""graphs/archviz_four_seeds.json renders what the ControlNet guide's ArchViz code renders: for each seed, a diffusers
StableDiffusionControlNetPipeline call with the style's prompt, no negative prompt, edges at 0.9 and depth at 0.6,
the checkpoint's own scheduler and torch.Generator("cpu").manual_seed(seed), on the same control images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from graphflow import Engine
from graphflow.models import ModelManager
from nodes.imaging import to_uint8

ROOT = Path(__file__).resolve().parents[2]
GUIDE_STYLES = {  # the guide's table; anything else falls back to modern
    "modern": "modern interior design, clean lines, natural light",
    "industrial": "industrial loft, exposed brick, metal fixtures",
    "scandinavian": "scandinavian interior, white walls, wooden floors",
}
TINY = {"checkpoint": "tiny:sd15", "canny_controlnet": "tiny:controlnet-canny",
        "depth_controlnet": "tiny:controlnet-depth", "depth_model": "tiny:dpt", "width": 64, "height": 48, "steps": 8}


@pytest.fixture
def engine(tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    monkeypatch.setenv("GRAPHFLOW_TINY_MODELS", str(tiny_models))
    return Engine(input_dirs=[ROOT], output_dir=tmp_path / "out", models=ModelManager())


def _guide_renders(tiny_models: Path, prompt: str, edges: torch.Tensor, depth: torch.Tensor, seeds: list[int],
                   steps: int) -> list[np.ndarray]:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    controlnets = [ControlNetModel.from_pretrained(tiny_models / name) for name in ("controlnet-canny",
                                                                                       "controlnet-depth")]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_models / "sd15", controlnet=controlnets,
                                                             safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = [Image.fromarray(to_uint8(edges)[0]), Image.fromarray(to_uint8(depth)[0])]
    return [pipe(prompt, image=images, controlnet_conditioning_scale=[0.9, 0.6], num_inference_steps=steps,
                 width=TINY["width"], height=TINY["height"], generator=torch.Generator("cpu").manual_seed(seed),
                 output_type="np").images[0] for seed in seeds]


@pytest.mark.parametrize("style", ["industrial", "brutalist"])
def test_each_seed_equals_the_guides_pipeline_call(engine: Engine, tiny_models: Path, style: str) -> None:
    result = engine.run(ROOT / "graphs" / "archviz_four_seeds.json", {**TINY, "style": style})
    images = result.outputs["images"]
    assert images.shape == (4, 48, 64, 3)
    prompt = GUIDE_STYLES.get(style, GUIDE_STYLES["modern"])
    expected = _guide_renders(tiny_models, prompt, result.outputs["edges"], result.outputs["depth"], [0, 1, 2, 3],
                              TINY["steps"])
    for image, reference in zip(to_uint8(images), expected, strict=True):
        np.testing.assert_array_equal(image, (reference * 255).round().astype(np.uint8))


def test_the_guides_defaults_are_the_templates(engine: Engine) -> None:
    compiled = engine.compile(ROOT / "graphs" / "archviz_four_seeds.json")
    params = compiled.params
    assert params["seeds"] == [0, 1, 2, 3] and params["steps"] == 30 and params["style"] == "modern"
    assert (params["edges_scale"], params["depth_scale"], params["cfg"]) == (0.9, 0.6, 7.5)
    sampler = next(node for node in compiled.nodes.values() if node.node_type.type_name == "Sampler")
    assert sampler.inputs["negative"] is None and sampler.inputs["scheduler"] == "default"
