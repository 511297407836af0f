"""Every example graph in graphs/ validates and runs end to end on the tiny models, with real pixels checked.

Model sources are template params; `tiny:NAME` points them at the session's tiny models
(GRAPHFLOW_TINY_MODELS), so these runs go through the same loaders as real checkpoints.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from graphflow import Engine
from graphflow.models import ModelManager

ROOT = Path(__file__).resolve().parents[2]
GRAPHS = ROOT / "graphs"
FAST = {"steps": 2}


@pytest.fixture
def engine(tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    monkeypatch.setenv("GRAPHFLOW_TINY_MODELS", str(tiny_models))
    return Engine(input_dirs=[ROOT], output_dir=tmp_path / "out", models=_MODELS)


_MODELS = ModelManager()  # shared by this module's tests: each tiny model loads once


def _run(engine: Engine, graph: str, **params: object) -> object:
    return engine.run(GRAPHS / graph, {**FAST, **params})


@pytest.mark.parametrize("graph", sorted(path.name for path in GRAPHS.glob("*.json")))
def test_every_example_graph_is_valid(graph: str) -> None:
    completed = subprocess.run([sys.executable, "-m", "graphflow.cli", "validate", str(GRAPHS / graph)],
                               capture_output=True, text=True, cwd=ROOT, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_every_example_uses_real_model_ids_by_default() -> None:
    for path in GRAPHS.glob("*.json"):
        for name, spec in json.loads(path.read_text()).get("params", {}).items():
            if name in ("checkpoint", "vae") or name.endswith(("controlnet", "_model")):
                assert "/" in spec["default"] and not spec["default"].startswith("tiny:"), (path.name, name)


def test_controlnet_canny_renders_and_saves_at_the_asked_size(engine: Engine) -> None:
    result = _run(engine, "controlnet_canny.json", checkpoint="tiny:sd15", controlnet="tiny:controlnet-canny",
                  width=64, height=48)
    assert result.outputs["image"].shape == (1, 48, 64, 3)
    assert [path.name for path in result.files] == ["controlnet_canny_00000.png"]
    weaker = _run(engine, "controlnet_canny.json", checkpoint="tiny:sd15", controlnet="tiny:controlnet-canny",
                  width=64, height=48, scale=0.2)
    assert sorted(weaker.ran) == ["control", "decode", "sample", "save"]
    assert not torch.equal(weaker.outputs["image"], result.outputs["image"])


def test_the_demo_runs_the_canny_template_on_tiny_models(engine: Engine) -> None:
    result = engine.run(GRAPHS / "demo.json")
    assert result.outputs["image"].shape == (1, 96, 128, 3)
    assert [path.name for path in result.files] == ["demo_00000.png"]


def test_multi_controlnet_weights_each_control(engine: Engine) -> None:
    params = {"checkpoint": "tiny:sd15", "pose_controlnet": "tiny:controlnet-pose",
              "depth_controlnet": "tiny:controlnet-depth", "canny_controlnet": "tiny:controlnet-canny",
              "depth_model": "tiny:dpt", "width": 64, "height": 48}
    first = _run(engine, "multi_controlnet.json", **params)
    assert first.outputs["image"].shape == (1, 48, 64, 3)
    reweighted = _run(engine, "multi_controlnet.json", **params, depth_scale=0.0)
    assert "depth" not in reweighted.ran and "sample" in reweighted.ran
    assert not torch.equal(first.outputs["image"], reweighted.outputs["image"])


def test_temporal_windows_change_the_result(engine: Engine) -> None:
    params = {"checkpoint": "tiny:sd15", "pose_controlnet": "tiny:controlnet-pose",
              "canny_controlnet": "tiny:controlnet-canny", "width": 64, "height": 48, "steps": 4}
    windowed = _run(engine, "temporal_controlnet.json", **params)
    always = _run(engine, "temporal_controlnet.json", **params, pose_end=1.0, edges_start=0.0)
    assert not torch.equal(windowed.outputs["image"], always.outputs["image"])


def test_img2img_strength_decides_how_far_the_init_image_is_left(engine: Engine) -> None:
    params = {"checkpoint": "tiny:sd15", "controlnet": "tiny:controlnet-canny", "steps": 4}
    light = _run(engine, "img2img_style.json", **params, strength=0.3)
    heavy = _run(engine, "img2img_style.json", **params, strength=1.0)
    assert light.outputs["image"].shape == (1, 96, 128, 3)
    assert "encode" not in heavy.ran  # the init image's encoding is reused
    assert not torch.equal(light.outputs["image"], heavy.outputs["image"])


@pytest.mark.parametrize("checkpoint", ["tiny:sd15-inpaint", "tiny:sd15"])
def test_inpainting_repaints_only_inside_the_mask(engine: Engine, checkpoint: str) -> None:
    result = _run(engine, "inpaint.json", checkpoint=checkpoint, controlnet="tiny:controlnet-canny", feather=0)
    pasted, raw = result.outputs["image"], result.outputs["raw"]
    original = _load(engine, "graphs/assets/room.png")
    mask = _load(engine, "graphs/assets/room_mask.png", mask=True)
    outside = mask[0] == 0
    assert torch.equal(pasted[0][outside], original[0][outside])
    assert not torch.equal(pasted[0][~outside], original[0][~outside])
    assert not torch.equal(raw, pasted)


def test_sdxl_canny_runs_with_a_separate_vae(engine: Engine) -> None:
    result = _run(engine, "sdxl_canny.json", checkpoint="tiny:sdxl", controlnet="tiny:controlnet-sdxl",
                  vae="tiny:sdxl-vae", width=64, height=64)
    assert result.outputs["image"].shape == (1, 64, 64, 3)
    assert torch.isfinite(result.outputs["image"]).all()


def _load(engine: Engine, path: str, mask: bool = False) -> torch.Tensor:
    node = {"type": "LoadMask" if mask else "LoadImage", "inputs": {"path": path}}
    document = {"graphflow": 1, "nodes": {"load": node}, "outputs": {"out": "load.mask" if mask else "load.image"}}
    return engine.run(document).outputs["out"]


def test_archviz_renders_four_seeds_sharing_edges_depth_and_prompts(engine: Engine) -> None:
    params = {"checkpoint": "tiny:sd15", "canny_controlnet": "tiny:controlnet-canny",
              "depth_controlnet": "tiny:controlnet-depth", "depth_model": "tiny:dpt", "width": 64, "height": 48}
    result = _run(engine, "archviz_four_seeds.json", **params)
    images = result.outputs["images"]
    assert images.shape == (4, 48, 64, 3)
    assert len({image.numpy().tobytes() for image in images}) == 4
    assert len(list((engine.paths.output_root).glob("archviz_*.png"))) == 4
    restyled = _run(engine, "archviz_four_seeds.json", **params, style="industrial")
    assert {node.split("/")[1] for node in restyled.ran} == {"prompt", "positive", "sample", "decode", "save"}
    fallback = _run(engine, "archviz_four_seeds.json", **params, style="baroque")  # not in the table: modern's
    assert torch.equal(fallback.outputs["images"], images)


def test_inpainting_a_crop_renders_the_region_at_the_output_size_and_pastes_it_back(engine: Engine) -> None:
    # pixel for pixel the pipeline's padding_mask_crop: tests/graphs/test_inpaint_crop.py
    result = _run(engine, "inpaint_crop.json", checkpoint="tiny:sd15-inpaint", controlnet="tiny:controlnet-canny",
                  padding=8, width=64, height=64)
    original = _load(engine, "graphs/assets/room.png")
    mask = _load(engine, "graphs/assets/room_mask.png", mask=True)
    crop, pasted = result.outputs["crop"], result.outputs["image"]
    assert crop.shape == (1, 64, 64, 3) and pasted.shape == original.shape
    outside = mask[0] == 0
    assert torch.equal(pasted[0][outside], original[0][outside])
    assert not torch.equal(pasted[0][~outside], original[0][~outside])


@pytest.mark.parametrize(("graph", "pipeline"), [("img2img_style.json", "StableDiffusionControlNetImg2ImgPipeline"),
                                                 ("inpaint.json", "StableDiffusionControlNetInpaintPipeline"),
                                                 ("inpaint_crop.json", "StableDiffusionControlNetInpaintPipeline")])
def test_refinement_graphs_default_to_the_pipelines_controlnet_scale(graph: str, pipeline: str) -> None:
    """A user who sets no scale gets the pipeline's controlnet_conditioning_scale (0.8 img2img, 0.5 inpainting)."""
    import inspect

    import diffusers

    signature = inspect.signature(getattr(diffusers, pipeline).__call__)
    compiled = Engine(input_dirs=[ROOT]).compile(GRAPHS / graph)
    [control] = [node for node in compiled.nodes.values() if node.node_type.type_name == "ControlApply"]
    assert control.inputs["scale"] == signature.parameters["controlnet_conditioning_scale"].default
