"""TextEncode gives the diffusers pipelines' prompt embeddings; ControlApply checks and carries its settings."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from graphflow import Engine, Graph
from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from graphflow.models import ModelManager
from nodes import CheckpointLoader, ControlApply, ControlNetLoader, TextEncode

PROMPT = "a cosy reading corner, warm light"


@pytest.fixture(scope="module")
def engine(tiny_models: Path) -> Engine:
    return Engine(input_dirs=[tiny_models], models=ModelManager())


def loaded(engine: Engine, tiny_models: Path, checkpoint: str) -> dict[str, Any]:
    graph = Graph()
    graph.output("clip", graph.add(CheckpointLoader(model=str(tiny_models / checkpoint))).clip)
    return engine.run(graph).outputs


def encoded(engine: Engine, tiny_models: Path, checkpoint: str, text: str = PROMPT, **inputs: Any) -> dict[str, Any]:
    graph = Graph()
    clip = CheckpointLoader(model=str(tiny_models / checkpoint)).clip
    graph.output("conditioning", graph.add(TextEncode(clip=clip, text=text, **inputs)).conditioning)
    return engine.run(graph).outputs["conditioning"]


def pipeline(tiny_models: Path, class_name: str, checkpoint: str, **options: Any) -> Any:
    import diffusers

    return getattr(diffusers, class_name).from_pretrained(tiny_models / checkpoint, **options)


def test_sd15_embeddings_and_default_negative_equal_the_pipelines(engine: Engine, tiny_models: Path) -> None:
    conditioning = encoded(engine, tiny_models, "sd15")
    sd = pipeline(tiny_models, "StableDiffusionPipeline", "sd15", safety_checker=None)
    with torch.no_grad():
        positive, negative = sd.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt=None)

    assert conditioning.family == "sd15" and conditioning.pooled is None
    assert conditioning.embeds.shape == (1, 77, 32)
    assert torch.equal(conditioning.embeds, positive)
    assert torch.equal(conditioning.default_negative.embeds, negative)  # the encoded ""


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_embeddings_pooled_and_default_negative_equal_the_pipelines(force_zeros: bool, ctx: RunContext,
                                                                         engine: Engine, tiny_models: Path) -> None:
    clip = dataclasses.replace(loaded(engine, tiny_models, "sdxl")["clip"], force_zeros_for_empty_prompt=force_zeros)
    conditioning = TextEncode().run(ctx, clip=clip, text=PROMPT, clip_skip=0)["conditioning"]
    xl = pipeline(tiny_models, "StableDiffusionXLPipeline", "sdxl", force_zeros_for_empty_prompt=force_zeros,
                  add_watermarker=False)
    with torch.no_grad():
        positive, negative, pooled, negative_pooled = xl.encode_prompt(PROMPT, device="cpu")

    assert conditioning.family == "sdxl" and conditioning.embeds.shape == (1, 77, 64)
    assert torch.equal(conditioning.embeds, positive) and torch.equal(conditioning.pooled, pooled)
    default = conditioning.default_negative
    assert torch.equal(default.embeds, negative) and torch.equal(default.pooled, negative_pooled)
    assert bool(default.embeds.eq(0).all()) is force_zeros


def test_sdxl_clip_skip_equals_the_pipelines(engine: Engine, tiny_models: Path) -> None:
    conditioning = encoded(engine, tiny_models, "sdxl", clip_skip=1)
    xl = pipeline(tiny_models, "StableDiffusionXLPipeline", "sdxl", add_watermarker=False)
    with torch.no_grad():
        positive, negative, _, _ = xl.encode_prompt(PROMPT, device="cpu", clip_skip=1)

    assert torch.equal(conditioning.embeds, positive)
    assert torch.equal(conditioning.default_negative.embeds, negative)
    assert not torch.equal(conditioning.embeds, encoded(engine, tiny_models, "sdxl").embeds)


def test_sd15_clip_skip_takes_an_earlier_layer_through_the_final_layer_norm(engine: Engine,
                                                                           tiny_models: Path) -> None:
    # diffusers 0.42's own clip_skip path fails with transformers 5 (CLIPTextModel lost `.text_model`),
    # so this checks the formula it implements: hidden_states[-(clip_skip + 1)] through final_layer_norm
    conditioning = encoded(engine, tiny_models, "sd15", clip_skip=1)
    clip = loaded(engine, tiny_models, "sd15")["clip"]
    ids = clip.tokenizers[0](PROMPT, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    with clip.encoders[0].use() as encoder, torch.no_grad():
        expected = encoder.final_layer_norm(encoder(ids, output_hidden_states=True).hidden_states[-2])

    assert torch.equal(conditioning.embeds, expected)
    unskipped = encoded(engine, tiny_models, "sd15")
    assert torch.equal(conditioning.default_negative.embeds, unskipped.default_negative.embeds)


def test_clip_skip_past_the_first_layer_is_refused(ctx: RunContext, engine: Engine, tiny_models: Path) -> None:
    clip = loaded(engine, tiny_models, "sd15")["clip"]  # 2 layers
    with pytest.raises(NodeInputError, match=r"clip_skip 3 reaches past the first layer .* use at most 2"):
        TextEncode().run(ctx, clip=clip, text=PROMPT, clip_skip=3)


def test_a_prompt_longer_than_77_tokens_is_cut_like_the_pipeline_and_warned_about(
        engine: Engine, tiny_models: Path, caplog: pytest.LogCaptureFixture) -> None:
    long_prompt = "stone " * 40  # the tiny byte-level tokenizer makes a token per character
    with caplog.at_level(logging.WARNING, logger="nodes.conditioning"):
        conditioning = encoded(engine, tiny_models, "sd15", text=long_prompt)
    sd = pipeline(tiny_models, "StableDiffusionPipeline", "sd15", safety_checker=None)
    with torch.no_grad():
        positive, _ = sd.encode_prompt(long_prompt, "cpu", 1, False)

    assert torch.equal(conditioning.embeds, positive)
    assert "longer than CLIP's 77 tokens" in caplog.text


def test_conditioning_survives_the_disk_cache(tiny_models: Path, tmp_path: Path) -> None:
    first = Engine(input_dirs=[tiny_models], models=ModelManager(), disk_cache=tmp_path)
    stored = encoded(first, tiny_models, "sdxl")
    second = Engine(input_dirs=[tiny_models], models=ModelManager(), disk_cache=tmp_path)
    graph = Graph()
    clip = CheckpointLoader(model=str(tiny_models / "sdxl")).clip
    graph.output("conditioning", graph.add(TextEncode(clip=clip, text=PROMPT), "encode").conditioning)
    result = second.run(graph)

    assert "encode" in result.cached
    again = result.outputs["conditioning"]
    assert again.family == "sdxl"
    for name in ("embeds", "pooled"):
        assert torch.equal(getattr(again, name), getattr(stored, name))
        assert torch.equal(getattr(again.default_negative, name), getattr(stored.default_negative, name))


@pytest.fixture(scope="module")
def controlnet(engine: Engine, tiny_models: Path) -> Any:
    graph = Graph()
    graph.output("controlnet", graph.add(ControlNetLoader(model=str(tiny_models / "controlnet-canny"))).controlnet)
    return engine.run(graph).outputs["controlnet"]


def test_control_apply_carries_the_controlnet_image_and_window(ctx: RunContext, controlnet: Any) -> None:
    image = torch.rand(1, 64, 64, 3)

    control = ControlApply().run(ctx, controlnet=controlnet, image=image, scale=0.7, start=0.2, end=0.5)["control"]

    assert control.controlnet is controlnet and control.image is image
    assert (control.scale, control.start, control.end) == (0.7, 0.2, 0.5)
    # the pipelines' keep factor: 1 unless i/N < start or (i+1)/N > end
    assert [control.keep(step, 4) for step in range(4)] == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(("start", "end"), [(0.5, 0.5), (0.8, 0.2)])
def test_control_apply_refuses_a_window_that_ends_before_it_starts(start: float, end: float, ctx: RunContext,
                                                                   controlnet: Any) -> None:
    with pytest.raises(NodeInputError, match=f"start \\({start}\\) must be less than end \\({end}\\)"):
        ControlApply().run(ctx, controlnet=controlnet, image=torch.rand(1, 8, 8, 3), scale=1.0, start=start, end=end)
