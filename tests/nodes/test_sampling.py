"""EmptyLatent, Sampler, VAEEncode and VAEDecode: sizes, caching, progress, cancellation and clear refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from graphflow import Cancelled, CancelToken, Engine, Graph
from graphflow.context import RunContext
from graphflow.errors import NodeExecutionError, NodeInputError
from graphflow.events import Event, NodeProgress
from graphflow.models import ModelManager
from nodes import (
    CheckpointLoader,
    EmptyLatent,
    LoadImage,
    LoadMask,
    Sampler,
    SaveImage,
    TextEncode,
    VAEDecode,
    VAEEncode,
)
from tests.nodes.sampling_graphs import CANNY, SIZE, Control, make_engine, sampling_graph


@pytest.fixture(scope="module")
def engine(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return make_engine(tiny_models, tmp_path_factory.mktemp("sampling"))


def image_of(engine: Engine, graph: Graph) -> torch.Tensor:
    return engine.run(graph).outputs["image"]


def failure(engine: Engine, graph: Graph) -> BaseException:
    """The cause a node failed with."""
    with pytest.raises(NodeExecutionError) as raised:
        engine.run(graph)
    return raised.value.cause


def test_empty_latent_is_zeros_of_an_eighth_of_the_size_marked_empty(ctx: RunContext) -> None:
    latent = EmptyLatent().run(ctx, width=96, height=64, batch=3)["latent"]
    assert latent.samples.shape == (3, 4, 8, 12) and not latent.samples.any()
    assert latent.empty is True and latent.family is None and latent.size == (96, 64)


def test_empty_latent_refuses_sizes_that_are_not_multiples_of_8(ctx: RunContext) -> None:
    with pytest.raises(NodeInputError, match="100x64; width and height must be multiples of 8"):
        EmptyLatent().run(ctx, width=100, height=64, batch=1)


def test_the_seed_decides_the_image(engine: Engine, tiny_models: Path) -> None:
    first, again = image_of(engine, sampling_graph(tiny_models)), image_of(engine, sampling_graph(tiny_models))
    other = image_of(engine, sampling_graph(tiny_models, seed=8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == (1, SIZE, SIZE, 3) and first.dtype == torch.float32


def test_control_changes_the_image(engine: Engine, tiny_models: Path) -> None:
    controlled = image_of(engine, sampling_graph(tiny_models, width=SIZE, height=SIZE))
    free = image_of(engine, sampling_graph(tiny_models, controls=(), width=SIZE, height=SIZE))
    assert (controlled - free).abs().max() > 0.01


@pytest.mark.parametrize(("controls", "size", "expected"), [
    ((), {}, (64, 64)),  # the UNet's native size: sample_size 8 latents
    ((Control("controlnet-canny", "odd.png"),), {}, (80, 96)),  # the control image's 100x84, rounded down
    ((Control("controlnet-canny", "odd.png"),), {"width": 48}, (80, 48)),
    ((), {"width": 40, "height": 56}, (56, 40)),
])
def test_the_output_size_comes_from_width_height_else_the_control_image_else_the_model(
        controls: tuple[Control, ...], size: dict[str, int], expected: tuple[int, int], engine: Engine,
        tiny_models: Path) -> None:
    assert image_of(engine, sampling_graph(tiny_models, controls=controls, **size)).shape[1:3] == expected


def test_a_size_that_is_not_a_multiple_of_8_is_refused(engine: Engine, tiny_models: Path) -> None:
    cause = failure(engine, sampling_graph(tiny_models, width=60))
    assert isinstance(cause, NodeInputError) and "60x64; width and height must be multiples of 8" in str(cause)


def test_each_denoising_step_is_reported(engine: Engine, tiny_models: Path) -> None:
    events: list[Event] = []
    engine.run(sampling_graph(tiny_models, scheduler="ddim", seed=101), on_event=events.append)
    steps = [(event.step, event.total) for event in events if isinstance(event, NodeProgress)]
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_cancelling_mid_sampling_writes_nothing_and_keeps_what_ran_cached(tiny_models: Path, tmp_path: Path) -> None:
    engine = make_engine(tiny_models, tmp_path)
    graph = sampling_graph(tiny_models, seed=102)
    graph.add(SaveImage(image=graph.outputs["image"], prefix="render"), "save")
    cancel = CancelToken()

    def cancel_at_step_2(event: Event) -> None:
        if isinstance(event, NodeProgress) and event.step == 2:
            cancel.cancel()

    with pytest.raises(Cancelled):
        engine.run(graph, on_event=cancel_at_step_2, cancel=cancel)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    resumed = engine.run(graph)
    assert set(resumed.ran) == {"sampler", "decode", "save"}  # the prompt, models and control were kept
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["render_00000.png"]


def test_a_new_seed_reruns_only_the_sampler_and_what_follows(engine: Engine, tiny_models: Path) -> None:
    engine.run(sampling_graph(tiny_models, seed=103))
    rerun = engine.run(sampling_graph(tiny_models, seed=104))
    assert set(rerun.ran) == {"sampler", "decode"}


def test_latents_and_encodings_are_reused_from_the_disk_cache(tiny_models: Path, tmp_path: Path) -> None:
    def run(seed: int) -> Any:  # each time in a new process, as far as the caches can tell
        graph = sampling_graph(tiny_models, "sd15-inpaint", init_image="init.png", mask_image="mask.png",
                               mask_to=("encoder",), strength=0.7, seed=seed)
        return make_engine(tiny_models, tmp_path, disk_cache=tmp_path / "cache").run(graph)

    first, second = run(seed=1), run(seed=1)
    assert torch.equal(first.outputs["image"], second.outputs["image"])
    assert "sampler" in second.cached and not {"sampler", "encode", "positive"} & set(second.ran)
    third = run(seed=2)  # a new seed samples again, from the stored encodings
    assert "sampler" in third.ran and {"encode", "positive"} <= set(third.cached)


def test_vae_encode_keeps_the_distribution_and_decode_shows_its_mean(engine: Engine, tiny_models: Path) -> None:
    graph = Graph()
    sd = CheckpointLoader(model=str(tiny_models / "sd15"))
    encode = graph.add(VAEEncode(vae=sd.vae, image=LoadImage(path="init.png").image), "encode")
    graph.output("latent", encode.latent)
    graph.output("image", graph.add(VAEDecode(vae=sd.vae, latent=encode.latent)).image)
    outputs = engine.run(graph).outputs
    latent = outputs["latent"]
    assert latent.moments.shape == (1, 8, 8, 8) and latent.family == "sd15"
    assert torch.equal(latent.samples, latent.scaling_factor * latent.moments[:, :4])
    assert outputs["image"].shape == (1, SIZE, SIZE, 3)


def test_vae_encode_refuses_images_that_are_not_whole_latents(ctx: RunContext, engine: Engine,
                                                              tiny_models: Path) -> None:
    graph = Graph()
    graph.output("vae", graph.add(CheckpointLoader(model=str(tiny_models / "sd15"))).vae)
    vae = engine.run(graph).outputs["vae"]
    with pytest.raises(NodeInputError, match=r"the image is 64x60; .* multiples of 8 .*ResizePad"):
        VAEEncode().run(ctx, vae=vae, image=torch.rand(1, 60, 64, 3), mask=None)


def refused(engine: Engine, graph: Graph, message: str) -> None:
    cause = failure(engine, graph)
    assert isinstance(cause, NodeInputError), cause
    assert message in str(cause)


def test_a_controlnet_of_another_family_is_refused(engine: Engine, tiny_models: Path) -> None:
    refused(engine, sampling_graph(tiny_models, controls=(Control("controlnet-sdxl", "edges.png"),)),
            "the model is SD1.5")
    refused(engine, sampling_graph(tiny_models, controls=(Control("controlnet-sdxl", "edges.png"),)),
            "the ControlNet 1 (")


def test_conditioning_of_another_family_is_refused(engine: Engine, tiny_models: Path) -> None:
    sdxl_prompt = TextEncode(clip=CheckpointLoader(model=str(tiny_models / "sdxl")).clip, text="x").conditioning
    refused(engine, sampling_graph(tiny_models, controls=(), positive=sdxl_prompt), "the positive conditioning is SDXL")


def test_decoding_with_a_vae_of_another_family_is_refused(engine: Engine, tiny_models: Path) -> None:
    graph = sampling_graph(tiny_models, controls=())
    sdxl_vae = CheckpointLoader(model=str(tiny_models / "sdxl")).vae
    graph.output("image", graph.add(VAEDecode(vae=sdxl_vae, latent=graph["sampler"].latent)).image)
    refused(engine, graph, "the VAE is SDXL")


INIT = {"init_image": "init.png"}
INPAINT_9 = {"checkpoint": "sd15-inpaint", **INIT}


@pytest.mark.parametrize(("arguments", "message"), [
    ({"checkpoint": "sd15-inpaint"}, "9-channel inpainting UNet: it needs an image and a mask"),
    ({**INPAINT_9, "mask_image": "mask.png", "mask_to": ("sampler",)}, "give VAEEncode the mask too"),
    ({**INPAINT_9, "mask_image": "mask.png", "mask_to": ("encoder",), "mask": "edges.png"},
     "the Sampler's mask differs from the one VAEEncode masked the image with"),
    ({"mask": "mask.png", "latent": "empty"}, "inpainting needs the image to keep outside the mask"),
    ({**INIT, "mask_image": "odd.png"}, "the mask is 100x84 but the image is 64x64"),
    ({**INIT, "width": 32}, "width x height (32x0) differ from the latent's 64x64"),
    ({**INIT, "strength": 0.2, "scheduler": "ddim"}, "strength 0.2 of 3 steps leaves no step to run"),
])
def test_unusable_sampler_inputs_are_refused(arguments: dict[str, Any], message: str, engine: Engine,
                                             tiny_models: Path) -> None:
    arguments = dict(arguments)
    if "mask" in arguments:  # a mask linked to the Sampler only
        arguments["mask"] = LoadMask(path=arguments["mask"]).mask
    if arguments.get("latent") == "empty":
        arguments["latent"] = EmptyLatent(width=SIZE, height=SIZE).latent
    refused(engine, sampling_graph(tiny_models, arguments.pop("checkpoint", "sd15"), (CANNY,), **arguments), message)


def test_a_mask_batch_that_does_not_match_the_latents_is_refused(ctx: RunContext, engine: Engine,
                                                                 tiny_models: Path) -> None:
    graph = Graph()
    sd = graph.add(CheckpointLoader(model=str(tiny_models / "sd15")))
    graph.output("model", sd.model)
    graph.output("positive", graph.add(TextEncode(clip=sd.clip, text="x")).conditioning)
    graph.output("latent", graph.add(VAEEncode(vae=sd.vae, image=LoadImage(path="init.png").image)).latent)
    outputs = engine.run(graph).outputs
    ctx.models = engine.models
    with pytest.raises(NodeInputError, match="the mask batch has 2 masks for 1 latents"):
        Sampler().run(ctx, model=outputs["model"], positive=outputs["positive"], negative=None, control=None,
                      latent=outputs["latent"], mask=torch.ones(2, SIZE, SIZE), seed=0, steps=2, cfg=7.5,
                      scheduler="default", strength=1.0, guess_mode=False, width=0, height=0)


def test_an_sd15_vae_decodes_empty_latents_in_fp16_like_the_sd15_pipelines(tiny_models: Path, tmp_path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL

    document = {"graphflow": 1, "nodes": {
        "sd": {"type": "CheckpointLoader", "inputs": {"model": "sd15"}},
        "empty": {"type": "EmptyLatent", "inputs": {"width": 64, "height": 64}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": {"from": "sd.vae"}, "latent": {"from": "empty.latent"}}},
    }, "outputs": {"image": "decode.image"}}
    ours = Engine(input_dirs=[tiny_models], models=ModelManager(),
                  options={"device": "cpu", "dtype": "fp16"}).run(document).outputs["image"]
    vae = AutoencoderKL.from_pretrained(tiny_models / "sd15", subfolder="vae", dtype=torch.float16)
    assert vae.config.force_upcast  # the SD1.5 pipelines ignore it: they decode in fp16
    with torch.no_grad():
        decoded = vae.decode(torch.zeros(1, 4, 8, 8, dtype=torch.float16) / vae.config.scaling_factor).sample
    theirs = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
    assert torch.equal(ours, theirs)


def test_a_list_of_seeds_samples_each_seed_on_its_own(tiny_models: Path, tmp_path: Path) -> None:
    """seed [3, 5] with a batch of 2: four images, each seed's two equal to a run with that seed alone."""
    from nodes import CheckpointLoader, EmptyLatent, Sampler, TextEncode, VAEDecode

    def render(seed: int | list[int], events: list | None = None) -> torch.Tensor:
        graph = Graph("seeds")
        sd = graph.add(CheckpointLoader(model=str(tiny_models / "sd15")), "sd")
        text = graph.add(TextEncode(clip=sd.clip, text="a lamp"), "text")
        latent = graph.add(EmptyLatent(width=32, height=32, batch=2), "latent")
        sampled = graph.add(Sampler(model=sd.model, positive=text.conditioning, latent=latent.latent, seed=seed,
                                    steps=2, scheduler="euler"), "sampler")
        graph.output("image", graph.add(VAEDecode(vae=sd.vae, latent=sampled.latent), "decode").image)
        engine = Engine(input_dirs=[tiny_models], output_dir=tmp_path)
        return engine.run(graph, on_event=events.append if events is not None else None).outputs["image"]

    events: list = []
    both = render([3, 5], events)
    assert both.shape[0] == 4
    assert torch.equal(both[:2], render(3)) and torch.equal(both[2:], render(5))
    steps = [(event.step, event.total) for event in events if isinstance(event, NodeProgress)]
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]  # one bar over both seeds
