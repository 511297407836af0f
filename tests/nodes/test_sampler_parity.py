"""TextEncode -> Sampler -> VAEDecode graphs give the pixels of the equivalent diffusers pipeline.

Each case runs a real graph through the Engine (real loaders, tiny model folders) and the diffusers
pipeline over the same folders, with the same seed on a CPU generator, and prints one row of the
parity table: `pytest tests/nodes/test_sampler_parity.py -s | grep parity`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from graphflow import Engine
from nodes import EmptyLatent
from tests.nodes.sampling_graphs import (
    CANNY,
    PROMPT,
    SIZE,
    Control,
    Pipelines,
    compare,
    images_of,
    make_engine,
    sampling_graph,
)

pytest.importorskip("diffusers")

SD_CONTROLNET = "StableDiffusionControlNetPipeline"
SD_IMG2IMG = "StableDiffusionControlNetImg2ImgPipeline"
SD_INPAINT = "StableDiffusionControlNetInpaintPipeline"
SDXL_CONTROLNET = "StableDiffusionXLControlNetPipeline"
# Sampler choice -> the diffusers scheduler a user would swap in (None: the checkpoint's own, PNDM here)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "default": None,
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}


@pytest.fixture(scope="module")
def engine(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return make_engine(tiny_models, tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="module")
def pipelines(tiny_models: Path, engine: Engine) -> Pipelines:
    return Pipelines(tiny_models, images_of(engine))


def assert_same_pixels(case: str, engine: Engine, graph: Any, theirs: Any) -> None:
    difference, same = compare(case, engine.run(graph).outputs["image"], theirs)
    assert same, f"{case}: uint8 images differ (max abs diff {difference:.3g})"
    assert difference == 0.0, f"{case}: float images differ by up to {difference:.3g}"


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_single_controlnet_text_to_image_matches_the_pipeline(scheduler: str, engine: Engine, tiny_models: Path,
                                                               pipelines: Pipelines) -> None:
    theirs = pipelines.run(pipelines.pipeline(SD_CONTROLNET, scheduler=SCHEDULERS[scheduler]))
    assert_same_pixels(f"1 ControlNet txt2img, {scheduler}", engine,
                       sampling_graph(tiny_models, scheduler=scheduler), theirs)


@pytest.mark.parametrize("scheduler", ["default", "euler_a"])
def test_guess_mode_matches_the_pipeline(scheduler: str, engine: Engine, tiny_models: Path,
                                         pipelines: Pipelines) -> None:
    theirs = pipelines.run(pipelines.pipeline(SD_CONTROLNET, scheduler=SCHEDULERS[scheduler]), guess_mode=True)
    assert_same_pixels(f"guess mode, {scheduler}", engine,
                       sampling_graph(tiny_models, scheduler=scheduler, guess_mode=True), theirs)


@pytest.mark.parametrize(("case", "controls"), [
    ("3 ControlNets, scales 1.2/0.7/0.4", (Control("controlnet-pose", "pose.png", 1.2),
                                           Control("controlnet-depth", "depth.png", 0.7),
                                           Control("controlnet-canny", "edges.png", 0.4))),
    ("2 ControlNets, start 0/0.2, end 0.5/1", (Control("controlnet-pose", "pose.png", end=0.5),
                                               Control("controlnet-canny", "edges.png", start=0.2))),
    ("1 ControlNet, window 0.5-1 (no control on early steps)", (Control("controlnet-canny", "edges.png", start=0.5),)),
])
def test_multi_controlnet_scales_and_windows_match_the_pipeline(case: str, controls: tuple[Control, ...],
                                                                engine: Engine, tiny_models: Path,
                                                                pipelines: Pipelines) -> None:
    theirs = pipelines.run(pipelines.pipeline(SD_CONTROLNET, controls=controls), controls=controls, guess_mode=False)
    assert_same_pixels(case, engine, sampling_graph(tiny_models, controls=controls), theirs)


def test_three_controlnets_in_guess_mode_match_the_pipeline(engine: Engine, tiny_models: Path,
                                                            pipelines: Pipelines) -> None:
    controls = (Control("controlnet-pose", "pose.png", 1.2, end=0.5), Control("controlnet-depth", "depth.png", 0.7),
                Control("controlnet-canny", "edges.png", 0.4, start=0.2))
    theirs = pipelines.run(pipelines.pipeline(SD_CONTROLNET, controls=controls), controls=controls, guess_mode=True)
    assert_same_pixels("3 ControlNets, windows, guess mode", engine,
                       sampling_graph(tiny_models, controls=controls, guess_mode=True), theirs)


@pytest.mark.parametrize(("case", "graph_arguments", "pipeline_arguments"), [
    ("negative prompt", {"negative": "blurry, dark"}, {"negative_prompt": "blurry, dark"}),
    ("cfg 1 (guidance off)", {"cfg": 1.0}, {"guidance_scale": 1.0}),
    ("cfg 3.5", {"cfg": 3.5}, {"guidance_scale": 3.5}),
])
def test_prompt_and_size_settings_match_the_pipeline(case: str, graph_arguments: dict[str, Any],
                                                     pipeline_arguments: dict[str, Any], engine: Engine,
                                                     tiny_models: Path, pipelines: Pipelines) -> None:
    theirs = pipelines.run(pipelines.pipeline(SD_CONTROLNET), **pipeline_arguments)
    assert_same_pixels(case, engine, sampling_graph(tiny_models, **graph_arguments), theirs)


def _clip_skipped(pipeline: Any, clip_skip: int) -> torch.Tensor:
    """The prompt's embeddings as StableDiffusionPipeline.encode_prompt makes them for clip_skip: the hidden state
    clip_skip layers before the last, through the final layer norm. (Its own call reaches the norm as
    text_encoder.text_model.final_layer_norm, which transformers 5 moved, so it cannot run here.)"""
    tokens = pipeline.tokenizer(PROMPT, padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipeline.text_encoder(tokens, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return pipeline.text_encoder.final_layer_norm(hidden)


@pytest.mark.parametrize("negative", [None, "blurry, dark"])
def test_clip_skip_applies_to_the_prompt_only_as_in_the_pipeline(negative: str | None, engine: Engine,
                                                                 tiny_models: Path, pipelines: Pipelines) -> None:
    pipeline = pipelines.pipeline(SD_CONTROLNET)
    theirs = pipelines.run(pipeline, prompt=None, prompt_embeds=_clip_skipped(pipeline, 1), negative_prompt=negative)
    assert_same_pixels(f"clip_skip 1, negative {negative!r}", engine,
                       sampling_graph(tiny_models, clip_skip=1, negative=negative), theirs)


@pytest.mark.parametrize(("case", "size"), [
    ("control image 100x84, size from it (96x80)", {}),
    ("control image 100x84 resized to 64x48", {"width": 64, "height": 48}),
])
def test_control_images_are_sized_like_the_pipeline(case: str, size: dict[str, int], engine: Engine,
                                                    tiny_models: Path, pipelines: Pipelines) -> None:
    controls = (Control("controlnet-canny", "odd.png"),)
    theirs = pipelines.run(pipelines.pipeline(SD_CONTROLNET, controls=controls), controls=controls, **size)
    assert_same_pixels(case, engine, sampling_graph(tiny_models, controls=controls, **size), theirs)


def test_a_batch_from_empty_latent_matches_images_per_prompt(engine: Engine, tiny_models: Path,
                                                             pipelines: Pipelines) -> None:
    latent = EmptyLatent(width=SIZE, height=SIZE, batch=2).latent
    theirs = pipelines.run(pipelines.pipeline(SD_CONTROLNET), num_images_per_prompt=2)
    assert_same_pixels("EmptyLatent batch 2", engine, sampling_graph(tiny_models, latent=latent), theirs)


def test_text_to_image_without_controlnet_matches_stable_diffusion_pipeline(engine: Engine, tiny_models: Path,
                                                                           pipelines: Pipelines) -> None:
    theirs = pipelines.run(pipelines.pipeline("StableDiffusionPipeline", controls=()), controls=(), height=SIZE,
                           width=SIZE)
    assert_same_pixels("txt2img, no ControlNet", engine, sampling_graph(tiny_models, controls=(), width=SIZE,
                                                                        height=SIZE), theirs)


@pytest.mark.parametrize("scheduler", ["default", "euler_a"])
@pytest.mark.parametrize("strength", [0.3, 0.8, 1.0])
def test_img2img_matches_the_pipeline(strength: float, scheduler: str, engine: Engine, tiny_models: Path,
                                      pipelines: Pipelines) -> None:
    pipeline = pipelines.pipeline(SD_IMG2IMG, scheduler=SCHEDULERS[scheduler])
    # 4 steps: strength 0.3 of 3 steps would leave none to run
    theirs = pipelines.run(pipeline, control_key="control_image", image=pipelines.image("init.png"), strength=strength,
                           num_inference_steps=4)
    graph = sampling_graph(tiny_models, init_image="init.png", strength=strength, scheduler=scheduler, steps=4)
    assert_same_pixels(f"img2img strength {strength}, {scheduler}", engine, graph, theirs)


@pytest.mark.parametrize("scheduler", ["default", "euler_a"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize(("checkpoint", "mask_to"), [
    ("sd15", ("sampler",)), ("sd15", ("encoder",)), ("sd15-inpaint", ("encoder",)),
    ("sd15-inpaint", ("encoder", "sampler"))])
def test_inpainting_matches_the_pipeline(checkpoint: str, mask_to: tuple[str, ...], strength: float, scheduler: str,
                                         engine: Engine, tiny_models: Path, pipelines: Pipelines) -> None:
    pipeline = pipelines.pipeline(SD_INPAINT, checkpoint=checkpoint, scheduler=SCHEDULERS[scheduler])
    theirs = pipelines.run(pipeline, control_key="control_image", image=pipelines.image("init.png"),
                           mask_image=pipelines.image("mask.png", "L"), strength=strength)
    graph = sampling_graph(tiny_models, checkpoint, init_image="init.png", mask_image="mask.png", mask_to=mask_to,
                           strength=strength, scheduler=scheduler)
    channels = 9 if checkpoint == "sd15-inpaint" else 4
    assert_same_pixels(f"inpaint {channels}-ch UNet, mask to {'+'.join(mask_to)}, strength {strength}, {scheduler}",
                       engine, graph, theirs)


SDXL_CANNY = Control("controlnet-sdxl", "edges.png", 0.5)


@pytest.mark.parametrize(("case", "graph_arguments", "pipeline_arguments"), [
    ("SDXL ControlNet txt2img", {}, {}),
    ("SDXL ControlNet txt2img, euler_a", {"scheduler": "euler_a"},
     {"scheduler": ("EulerAncestralDiscreteScheduler", {})}),
    ("SDXL ControlNet, negative prompt", {"negative": "blurry, dark"}, {"negative_prompt": "blurry, dark"}),
    ("SDXL ControlNet, guess mode", {"guess_mode": True}, {"guess_mode": True}),
])
def test_sdxl_controlnet_text_to_image_matches_the_pipeline(case: str, graph_arguments: dict[str, Any],
                                                            pipeline_arguments: dict[str, Any], engine: Engine,
                                                            tiny_models: Path, pipelines: Pipelines) -> None:
    pipeline = pipelines.pipeline(SDXL_CONTROLNET, "sdxl", (SDXL_CANNY,), pipeline_arguments.pop("scheduler", None))
    theirs = pipelines.run(pipeline, (SDXL_CANNY,), **pipeline_arguments)
    assert_same_pixels(case, engine, sampling_graph(tiny_models, "sdxl", (SDXL_CANNY,), **graph_arguments), theirs)


def test_sdxl_text_to_image_without_controlnet_matches_the_pipeline(engine: Engine, tiny_models: Path,
                                                                   pipelines: Pipelines) -> None:
    theirs = pipelines.run(pipelines.pipeline("StableDiffusionXLPipeline", "sdxl", ()), (), height=SIZE, width=SIZE)
    graph = sampling_graph(tiny_models, "sdxl", (), width=SIZE, height=SIZE)
    assert_same_pixels("SDXL txt2img, no ControlNet", engine, graph, theirs)


@pytest.mark.parametrize(("checkpoint", "class_name", "control"), [
    ("sd15", SD_CONTROLNET, CANNY),  # SD1.5 pipelines decode in fp16
    ("sdxl", SDXL_CONTROLNET, SDXL_CANNY),  # SDXL ones in fp32, as the tiny VAE's force_upcast asks
])
def test_fp16_matches_the_pipeline_in_fp16(checkpoint: str, class_name: str, control: Control, tiny_models: Path,
                                           tmp_path: Path) -> None:
    engine = make_engine(tiny_models, tmp_path, options={"device": "cpu", "dtype": "fp16"})
    pipelines = Pipelines(tiny_models, images_of(engine), dtype=torch.float16)
    theirs = pipelines.run(pipelines.pipeline(class_name, checkpoint, (control,)), (control,))
    assert_same_pixels(f"{checkpoint} ControlNet txt2img, fp16 on the CPU", engine,
                       sampling_graph(tiny_models, checkpoint, (control,)), theirs)


def test_sdxl_img2img_in_bf16_encodes_with_the_upcast_vae_like_the_pipeline(tiny_models: Path,
                                                                            tmp_path: Path) -> None:
    engine = make_engine(tiny_models, tmp_path, options={"device": "cpu", "dtype": "bf16"})
    pipelines = Pipelines(tiny_models, images_of(engine), dtype=torch.bfloat16)
    pipeline = pipelines.pipeline("StableDiffusionXLControlNetImg2ImgPipeline", "sdxl", (SDXL_CANNY,))
    theirs = pipelines.run(pipeline, (SDXL_CANNY,), control_key="control_image", image=pipelines.image("init.png"),
                           strength=0.8, num_inference_steps=4)
    graph = sampling_graph(tiny_models, "sdxl", (SDXL_CANNY,), init_image="init.png", strength=0.8, steps=4)
    assert_same_pixels("SDXL ControlNet img2img, bf16 on the CPU", engine, graph, theirs)
