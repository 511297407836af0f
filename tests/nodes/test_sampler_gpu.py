"""On a CUDA GPU in fp16, graphs give the pixels of the stock diffusers pipelines (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.nodes.sampling_graphs import (
    CANNY,
    Control,
    Pipelines,
    compare,
    images_of,
    make_engine,
    sampling_graph,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SDXL_CANNY = Control("controlnet-sdxl", "edges.png", 0.5)
THREE = (Control("controlnet-pose", "pose.png", 1.2), Control("controlnet-depth", "depth.png", 0.7),
         Control("controlnet-canny", "edges.png", 0.4, start=0.2))


@pytest.mark.parametrize(("case", "checkpoint", "class_name", "controls", "arguments"), [
    ("1 ControlNet", "sd15", "StableDiffusionControlNetPipeline", (CANNY,), {}),
    ("3 ControlNets, windows, euler_a", "sd15", "StableDiffusionControlNetPipeline", THREE,
     {"scheduler": "euler_a"}),
    ("SDXL ControlNet (fp32 decode: force_upcast)", "sdxl", "StableDiffusionXLControlNetPipeline", (SDXL_CANNY,), {}),
])
def test_fp16_on_cuda_matches_the_stock_pipeline(case: str, checkpoint: str, class_name: str,
                                                 controls: tuple[Control, ...], arguments: dict[str, str],
                                                 tiny_models: Path, tmp_path: Path) -> None:
    engine = make_engine(tiny_models, tmp_path, options={"device": "cuda", "dtype": "fp16"})
    pipelines = Pipelines(tiny_models, images_of(engine), device="cuda", dtype=torch.float16)
    scheduler = ("EulerAncestralDiscreteScheduler", {}) if arguments.get("scheduler") == "euler_a" else None
    theirs = pipelines.run(pipelines.pipeline(class_name, checkpoint, controls, scheduler), controls)
    ours = engine.run(sampling_graph(tiny_models, checkpoint, controls, **arguments)).outputs["image"]
    difference, same = compare(f"{case}, fp16 on CUDA", ours, theirs)
    assert same and difference <= 1e-3, f"{case}: max abs diff {difference:.3g}, uint8 equal {same}"
