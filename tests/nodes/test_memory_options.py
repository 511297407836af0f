"""The memory options (VAE tiling and slicing, attention slicing) give diffusers' pixels with the same switches on,
key the results they change, and leave the shared modules as they were: the default path is bit-equal after them.

Measured on the CPU with the tiny models: none of them is bit-equal to the default (VAE and attention slicing
differ from it by ~1e-6, tiling by up to ~0.6 on a 0..1 scale), so each is part of its nodes' cache keys.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from graphflow import Engine, Graph
from graphflow.cli import _parser
from graphflow.cli_options import _memory_options
from graphflow.errors import NodeExecutionError
from graphflow.models.memory import MemoryOptions
from nodes import CheckpointLoader, EmptyLatent
from tests.nodes.sampling_graphs import SIZE, Pipelines, compare, images_of, make_engine, sampling_graph

pytest.importorskip("diffusers")

SD_CONTROLNET = "StableDiffusionControlNetPipeline"
TILED_32 = {"vae_tiling": True, "vae_tile_size": 32}  # 4x4-latent tiles: a 64 px image is decoded in 9 of them


@pytest.fixture(scope="module")
def engine(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return make_engine(tiny_models, tmp_path_factory.mktemp("memory"))


@pytest.fixture(scope="module")
def pipelines(tiny_models: Path, engine: Engine) -> Pipelines:
    return Pipelines(tiny_models, images_of(engine))


def fresh(engine: Engine) -> Engine:
    """An engine with empty result caches over the same model manager (so the same shared modules)."""
    return Engine(input_dirs=engine.paths.input_roots, output_dir=engine.paths.output_root, models=engine.models)


@contextmanager
def tiled(vae: Any, tile: int | None = None) -> Iterator[None]:
    """`vae.enable_tiling()` inside the block, with a tile of `tile` pixels (the tiny VAE has 8 pixels per latent)."""
    sizes = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.enable_tiling()
    if tile is not None:
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
    try:
        yield
    finally:
        vae.disable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = sizes


@contextmanager
def switched(on: Any, off: Any) -> Iterator[None]:
    on()
    try:
        yield
    finally:
        off()


def assert_same_pixels(case: str, ours: torch.Tensor, theirs: Any) -> None:
    difference, same = compare(case, ours, theirs)
    assert same, f"{case}: uint8 images differ (max abs diff {difference:.3g})"
    assert difference == 0.0, f"{case}: float images differ by up to {difference:.3g}"


def image(engine: Engine, graph: Graph, **options: Any) -> torch.Tensor:
    return engine.run(graph, options=options).outputs["image"]


def test_vae_tiling_at_128px_matches_the_pipeline_with_enable_tiling(engine: Engine, tiny_models: Path,
                                                                     pipelines: Pipelines) -> None:
    graph = sampling_graph(tiny_models, controls=(), width=128, height=128)
    pipeline = pipelines.pipeline("StableDiffusionPipeline", controls=())
    with tiled(pipeline.vae):  # the VAE's own 64 px tile: 128 px latents (16 x 16) come in 3 x 3 tiles
        theirs = pipelines.run(pipeline, controls=(), width=128, height=128)
    ours = image(engine, graph, vae_tiling=True)
    assert_same_pixels("VAE tiling, 128 px, the VAE's 64 px tiles", ours, theirs)
    assert not torch.equal(ours, image(engine, graph)), "the tiled decode should differ: was it tiled at all?"


def test_vae_tiling_with_a_smaller_tile_matches_the_pipeline(engine: Engine, tiny_models: Path,
                                                            pipelines: Pipelines) -> None:
    pipeline = pipelines.pipeline(SD_CONTROLNET)
    with tiled(pipeline.vae, 32):
        theirs = pipelines.run(pipeline)
    ours = image(engine, sampling_graph(tiny_models), **TILED_32)
    assert_same_pixels("VAE tiling, 64 px, 32 px tiles", ours, theirs)
    assert not torch.equal(ours, image(engine, sampling_graph(tiny_models)))


def test_tiled_encode_and_decode_in_img2img_match_the_pipeline(engine: Engine, tiny_models: Path,
                                                              pipelines: Pipelines) -> None:
    pipeline = pipelines.pipeline("StableDiffusionControlNetImg2ImgPipeline")
    with tiled(pipeline.vae, 32):
        theirs = pipelines.run(pipeline, control_key="control_image", image=pipelines.image("init.png"),
                               strength=0.8, num_inference_steps=4)
    graph = sampling_graph(tiny_models, init_image="init.png", strength=0.8, steps=4)
    assert_same_pixels("img2img, VAE tiling (encode and decode), 32 px tiles", image(engine, graph, **TILED_32), theirs)


def test_vae_slicing_of_a_batch_of_two_matches_the_pipeline_with_enable_slicing(engine: Engine, tiny_models: Path,
                                                                                pipelines: Pipelines) -> None:
    pipeline = pipelines.pipeline(SD_CONTROLNET)
    with switched(pipeline.vae.enable_slicing, pipeline.vae.disable_slicing):
        theirs = pipelines.run(pipeline, num_images_per_prompt=2)
    graph = sampling_graph(tiny_models, latent=EmptyLatent(width=SIZE, height=SIZE, batch=2).latent)
    assert_same_pixels("VAE slicing, batch 2", image(engine, graph, vae_slicing=True), theirs)


def test_sliced_encoding_of_a_batch_matches_diffusers(engine: Engine, tiny_models: Path, pipelines: Pipelines) -> None:
    from nodes.latents import encode

    graph = Graph("vae")
    graph.output("vae", graph.add(CheckpointLoader(model=str(tiny_models / "sd15"))).vae)
    vae = engine.run(graph).outputs["vae"]
    pixels = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    theirs = pipelines.components("sd15")["vae"]
    with torch.no_grad(), switched(theirs.enable_slicing, theirs.disable_slicing):
        expected = theirs.encode(pixels).latent_dist.parameters
    with torch.no_grad():
        assert torch.equal(encode(vae, pixels, MemoryOptions(vae_slicing=True)), expected)


@pytest.mark.parametrize("slice_size", ["auto", "max", 1])
def test_attention_slicing_matches_the_pipeline_with_enable_attention_slicing(slice_size: str | int, engine: Engine,
                                                                              tiny_models: Path,
                                                                              pipelines: Pipelines) -> None:
    pipeline = pipelines.pipeline(SD_CONTROLNET)  # one ControlNet: the pipeline slices it too
    with switched(lambda: pipeline.enable_attention_slicing(slice_size), pipeline.disable_attention_slicing):
        theirs = pipelines.run(pipeline)
    ours = image(engine, sampling_graph(tiny_models), attention_slicing=slice_size)
    assert_same_pixels(f"attention slicing {slice_size!r}", ours, theirs)


def test_sdxl_attention_slicing_matches_the_pipeline(engine: Engine, tiny_models: Path, pipelines: Pipelines) -> None:
    pipeline = pipelines.pipeline("StableDiffusionXLPipeline", "sdxl", ())
    with switched(pipeline.enable_attention_slicing, pipeline.disable_attention_slicing):
        theirs = pipelines.run(pipeline, (), height=SIZE, width=SIZE)
    ours = image(engine, sampling_graph(tiny_models, "sdxl", (), width=SIZE, height=SIZE), attention_slicing=True)
    assert_same_pixels("SDXL attention slicing 'auto'", ours, theirs)


def shared_modules(engine: Engine, tiny_models: Path) -> dict[str, Any]:
    """The UNet, ControlNet and VAE modules the engine's graphs share, as they are between runs."""
    from nodes import ControlNetLoader

    graph = Graph("modules")
    sd = graph.add(CheckpointLoader(model=str(tiny_models / "sd15")))
    graph.output("model", sd.model)
    graph.output("vae", sd.vae)
    graph.output("controlnet", graph.add(ControlNetLoader(model=str(tiny_models / "controlnet-canny"))).controlnet)
    outputs = engine.run(graph).outputs
    handles = {"unet": outputs["model"].unet, "vae": outputs["vae"].vae, "controlnet": outputs["controlnet"].controlnet}
    modules = {}
    for name, handle in handles.items():
        with handle.use() as module:
            modules[name] = module
    return modules


def module_state(modules: dict[str, Any]) -> dict[str, Any]:
    vae = modules["vae"]
    return {"vae": (vae.use_tiling, vae.use_slicing, vae.tile_sample_min_size, vae.tile_latent_min_size),
            **{name: {key: type(processor).__name__ for key, processor in modules[name].attn_processors.items()}
               for name in ("unet", "controlnet")}}


def test_the_default_path_is_unchanged_after_runs_with_memory_options(engine: Engine, tiny_models: Path,
                                                                     pipelines: Pipelines) -> None:
    modules = shared_modules(engine, tiny_models)
    before = module_state(modules)
    graph = sampling_graph(tiny_models, init_image="init.png", strength=0.8, steps=4)
    default = image(fresh(engine), graph)
    image(fresh(engine), graph, **TILED_32, vae_slicing=True, attention_slicing="max")
    assert module_state(modules) == before
    assert before["vae"] == (False, False, 64, 8) and {"AttnProcessor2_0"} == set(before["unet"].values())
    assert torch.equal(image(fresh(engine), graph), default)
    theirs = pipelines.run(pipelines.pipeline("StableDiffusionControlNetImg2ImgPipeline"), control_key="control_image",
                           image=pipelines.image("init.png"), strength=0.8, num_inference_steps=4)
    assert_same_pixels("img2img, default path after memory options", default, theirs)


def test_a_failing_option_leaves_the_modules_as_they_were(engine: Engine, tiny_models: Path) -> None:
    modules = shared_modules(engine, tiny_models)
    before = module_state(modules)
    with pytest.raises(NodeExecutionError, match="attention_slicing 1000"):
        fresh(engine).run(sampling_graph(tiny_models), options={"attention_slicing": 1000, **TILED_32})
    with pytest.raises(NodeExecutionError, match="multiple of its 8 pixels"):
        fresh(engine).run(sampling_graph(tiny_models), options={"vae_tiling": True, "vae_tile_size": 36})
    assert module_state(modules) == before


@pytest.mark.parametrize(("options", "message"), [
    ({"vae_tiling": "yes"}, "vae_tiling is 'yes'; expected true or false"),
    ({"vae_tiling": True, "vae_tile_size": 4}, "vae_tile_size is 4"),
    ({"attention_slicing": "half"}, "attention_slicing is 'half'; expected 'auto', 'max'"),
])
def test_bad_option_values_fail_the_node_that_uses_them(options: dict[str, Any], message: str, engine: Engine,
                                                        tiny_models: Path) -> None:
    with pytest.raises(NodeExecutionError, match=message):
        fresh(engine).run(sampling_graph(tiny_models), options=options)


def test_each_option_reruns_exactly_the_nodes_it_changes(tiny_models: Path, tmp_path: Path) -> None:
    engine = make_engine(tiny_models, tmp_path)
    graph = sampling_graph(tiny_models, init_image="init.png", strength=0.8, steps=4)
    engine.run(graph)
    ran = {name: set(engine.run(graph, options=options).ran) for name, options in {
        "tiling": {"vae_tiling": True}, "tile size": TILED_32, "slicing": {"vae_slicing": True},
        "attention": {"attention_slicing": "auto"}, "attention max": {"attention_slicing": "max"},
        "attention True is auto": {"attention_slicing": True},
        "off as unset": {"vae_tiling": False, "vae_slicing": None, "attention_slicing": False},
        "a tile size without tiling": {"vae_tile_size": 32}}.items()}
    assert ran == {"tiling": {"encode", "sampler", "decode"}, "tile size": {"encode", "sampler", "decode"},
                   "slicing": {"encode", "sampler", "decode"}, "attention": {"sampler", "decode"},
                   "attention max": {"sampler", "decode"}, "attention True is auto": set(), "off as unset": set(),
                   "a tile size without tiling": set()}


def test_threads_with_and_without_memory_options_never_see_each_other(engine: Engine, tiny_models: Path) -> None:
    graph = sampling_graph(tiny_models)
    variants: dict[str, dict[str, Any]] = {"default": {}, "memory": {**TILED_32, "attention_slicing": "max"}}
    expected = {name: image(fresh(engine), graph, **options) for name, options in variants.items()}
    assert not torch.equal(expected["default"], expected["memory"])
    wrong: list[str] = []

    def work(name: str) -> None:
        for _ in range(4):
            if not torch.equal(image(fresh(engine), graph, **variants[name]), expected[name]):
                wrong.append(name)

    threads = [threading.Thread(target=work, args=(name,)) for name in (*variants, *variants)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_the_cli_takes_the_memory_options() -> None:
    args = _parser().parse_args(["run", "g.json", "--vae-tiling", "--vae-tile-size", "256", "--vae-slicing",
                                 "--attention-slicing"])
    assert _memory_options(args) == {"vae_tiling": True, "vae_tile_size": 256, "vae_slicing": True,
                                     "attention_slicing": "auto", "swap_controlnets": False}
    sliced = _parser().parse_args(["run", "g.json", "--attention-slicing", "2"])
    assert _memory_options(sliced)["attention_slicing"] == 2
    assert _memory_options(_parser().parse_args(["run", "g.json"])) == {
        "vae_tiling": False, "vae_tile_size": None, "vae_slicing": False, "attention_slicing": None,
        "swap_controlnets": False}
    swapped = _parser().parse_args(["run", "g.json", "--swap-controlnets"])
    assert _memory_options(swapped)["swap_controlnets"] is True
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "g.json", "--attention-slicing", "half"])
