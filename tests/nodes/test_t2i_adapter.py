"""T2I-Adapters: T2IAdapterLoader -> T2IAdapterApply -> Sampler give the pixels of diffusers' adapter pipelines.

Each parity case runs a real graph through the Engine (real loaders, the tiny model folders) and
StableDiffusionAdapterPipeline or StableDiffusionXLAdapterPipeline over the same folders, with the same seed, and
prints one row of the parity table: `pytest tests/nodes/test_t2i_adapter.py -s | grep parity`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from graphflow import Engine
from graphflow.errors import GraphflowError
from nodes import EmptyLatent, LoadImage, T2IAdapterApply, T2IAdapterLoader
from tests.nodes.sampling_graphs import (
    CANNY,
    PROMPT,
    SEED,
    SIZE,
    Pipelines,
    compare,
    images_of,
    make_engine,
    sampling_graph,
)

pytest.importorskip("diffusers")

SD = "StableDiffusionAdapterPipeline"
SDXL = "StableDiffusionXLAdapterPipeline"


@dataclass(frozen=True)
class Adapter:
    """One T2IAdapterApply: a tiny adapter folder, a test image, scale and conditioning factor."""

    model: str
    image: str
    scale: float = 1.0
    factor: float = 1.0


CANNY_ADAPTER = Adapter("t2i-adapter-canny", "edges.png", 0.8)


@pytest.fixture(scope="module")
def engine(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return make_engine(tiny_models, tmp_path_factory.mktemp("t2i-adapter"))


@pytest.fixture(scope="module")
def pipelines(tiny_models: Path, engine: Engine) -> Pipelines:
    return Pipelines(tiny_models, images_of(engine))


def adapter_graph(tiny_models: Path, checkpoint: str, adapters: tuple[Adapter, ...], *, controls: tuple = (),
                  loader: dict[str, str] | None = None, **sampler: Any) -> Any:
    """sampling_graph with a T2IAdapterLoader -> T2IAdapterApply per adapter in the Sampler's adapters list."""
    applied = [T2IAdapterApply(adapter=T2IAdapterLoader(**(loader or {"model": str(tiny_models / a.model)})).adapter,
                               image=LoadImage(path=a.image).image, scale=a.scale,
                               conditioning_factor=a.factor).adapter for a in adapters]
    return sampling_graph(tiny_models, checkpoint, controls, adapters=applied, **{"width": SIZE, "height": SIZE}
                          | sampler)


@contextmanager
def adapter_cut_off(unet: torch.nn.Module, steps: int) -> Iterator[None]:
    """The SD1.5 adapter pipeline has no adapter_conditioning_factor: drop the adapter's residuals from the UNet's
    calls after the first `steps`, as the SDXL pipeline's factor does."""
    calls = [0]

    def hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        calls[0] += 1
        if calls[0] > steps:
            kwargs["down_intrablock_additional_residuals"] = None
        return args, kwargs

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def run_pipeline(pipelines: Pipelines, class_name: str, checkpoint: str, adapters: tuple[Adapter, ...], *,
                 steps: int = 3, **arguments: Any) -> tuple[Any, Any]:
    """(pipeline, its output images) of the adapter pipeline over the tiny folders (a MultiAdapter for several,
    weights = scales); float images unless `output_type` says otherwise."""
    import diffusers
    from diffusers import MultiAdapter, T2IAdapter

    components = pipelines.components(checkpoint)
    pipeline_class = getattr(diffusers, class_name)
    modules, options = pipeline_class._get_signature_keys(pipeline_class)
    parts = {name: value for name, value in components.items() if name in modules}
    parts["scheduler"] = type(components["scheduler"]).from_config(components["scheduler"].config)
    nets = [T2IAdapter.from_pretrained(pipelines.tiny_models / adapter.model) for adapter in adapters]
    parts["adapter"] = nets[0] if len(nets) == 1 else MultiAdapter(nets)
    parts.update({name: False for name in ("requires_safety_checker",) if name in options})
    pipeline = pipeline_class(**parts)
    pipeline.set_progress_bar_config(disable=True)
    images = [pipelines.image(adapter.image) for adapter in adapters]
    scales = [adapter.scale for adapter in adapters]
    factor = adapters[0].factor
    arguments = {"height": SIZE, "width": SIZE} | arguments
    if class_name == SDXL:
        arguments["adapter_conditioning_factor"] = factor
    with adapter_cut_off(pipeline.unet, int(steps * factor)) if class_name == SD and factor < 1 else nullcontext():
        output = pipeline(PROMPT, image=images[0] if len(images) == 1 else images, num_inference_steps=steps,
                          guidance_scale=7.5, adapter_conditioning_scale=scales[0] if len(scales) == 1 else scales,
                          generator=torch.Generator("cpu").manual_seed(SEED), **{"output_type": "np"} | arguments)
    return pipeline, output.images


def assert_same_pixels(case: str, engine: Engine, graph: Any, theirs: np.ndarray) -> None:
    difference, same = compare(case, engine.run(graph).outputs["image"], theirs)
    assert same, f"{case}: uint8 images differ (max abs diff {difference:.3g})"
    assert difference == 0.0, f"{case}: float images differ by up to {difference:.3g}"


PARITY = [
    ("SD1.5 T2I-Adapter, scale 0.8", SD, "sd15", (CANNY_ADAPTER,), {}),
    ("SD1.5 T2I-Adapter, scale 0.8, factor 0.5", SD, "sd15", (Adapter("t2i-adapter-canny", "edges.png", 0.8, 0.5),),
     {"steps": 4}),
    ("SD1.5 2 T2I-Adapters (MultiAdapter), weights 0.8/0.4, factor 0.75", SD, "sd15",
     (Adapter("t2i-adapter-canny", "edges.png", 0.8, 0.75), Adapter("t2i-adapter-depth", "depth.png", 0.4, 0.75)),
     {"steps": 4}),
    ("SD1.5 T2I-Adapter, image 100x84 resized to 64x48", SD, "sd15", (Adapter("t2i-adapter-canny", "odd.png"),),
     {"width": 64, "height": 48}),
    ("SDXL T2I-Adapter, scale 0.7, factor 0.5", SDXL, "sdxl", (Adapter("t2i-adapter-sdxl", "edges.png", 0.7, 0.5),),
     {"steps": 4}),
    ("SDXL 2 T2I-Adapters (MultiAdapter), weights 0.9/0.3, factor 0.75", SDXL, "sdxl",
     (Adapter("t2i-adapter-sdxl", "edges.png", 0.9, 0.75), Adapter("t2i-adapter-sdxl-depth", "depth.png", 0.3, 0.75)),
     {"steps": 4}),
    ("SDXL T2I-Adapter, EmptyLatent batch 2, euler_a", SDXL, "sdxl",
     (Adapter("t2i-adapter-sdxl", "edges.png", 0.7, 0.5),), {"steps": 4, "batch": 2, "scheduler": "euler_a"}),
]


@pytest.mark.parametrize(("case", "class_name", "checkpoint", "adapters", "settings"), PARITY,
                         ids=[case for case, *_ in PARITY])
def test_t2i_adapters_match_the_adapter_pipelines(case: str, class_name: str, checkpoint: str,
                                                  adapters: tuple[Adapter, ...], settings: dict[str, Any],
                                                  engine: Engine, tiny_models: Path, pipelines: Pipelines) -> None:
    settings = dict(settings)
    steps, batch, scheduler = settings.pop("steps", 3), settings.pop("batch", 1), settings.pop("scheduler", None)
    arguments, graph_settings = dict(settings), dict(settings)
    if scheduler is not None:
        pipelines = _with_scheduler(pipelines, "EulerAncestralDiscreteScheduler")
        graph_settings["scheduler"] = scheduler
    if batch > 1:
        arguments["num_images_per_prompt"] = batch
        graph_settings.update(latent=EmptyLatent(width=SIZE, height=SIZE, batch=batch).latent, width=0, height=0)
    graph = adapter_graph(tiny_models, checkpoint, adapters, steps=steps, **graph_settings)
    if class_name == SDXL:
        assert_same_pixels(case, engine, graph, run_pipeline(pipelines, class_name, checkpoint, adapters, steps=steps,
                                                             **arguments)[1])
        return
    # the SD1.5 adapter pipeline decodes with the deprecated decode_latents, `vae.decode(1 / scaling_factor *
    # latents)`, whose rounding differs from the `latents / scaling_factor` of every other pipeline (and graphflow's
    # VAEDecode) in the last bits: its latents must be equal, its pixels the same in 8 bits
    pipeline, latents = run_pipeline(pipelines, class_name, checkpoint, adapters, steps=steps, output_type="latent",
                                     **arguments)
    graph.output("latent", graph["sampler"].latent)
    outputs = engine.run(graph).outputs
    latents_equal = torch.equal(outputs["latent"].samples, latents)
    print(f"\nparity | {case}, latents | max abs diff {(outputs['latent'].samples - latents).abs().max():.3g} | "
          f"equal {latents_equal}")
    assert latents_equal, f"{case}: latents differ"
    with torch.no_grad():
        difference, same = compare(case, outputs["image"], pipeline.decode_latents(latents))
    assert same, f"{case}: uint8 images differ (max abs diff {difference:.3g})"


def _with_scheduler(pipelines: Pipelines, name: str) -> Pipelines:
    """Pipelines whose components carry the scheduler `name` (made from the checkpoint's config, as users swap)."""
    import diffusers

    class Swapped(Pipelines):
        def components(self, checkpoint: str) -> dict[str, Any]:
            components = dict(pipelines.components(checkpoint))
            components["scheduler"] = getattr(diffusers, name).from_config(components["scheduler"].config)
            return components

    return Swapped(pipelines.tiny_models, pipelines.images)


def image_of(engine: Engine, graph: Any) -> torch.Tensor:
    return engine.run(graph).outputs["image"]


def test_an_adapter_beside_a_controlnet_adds_to_both(engine: Engine, tiny_models: Path) -> None:
    both = image_of(engine, adapter_graph(tiny_models, "sd15", (CANNY_ADAPTER,), controls=(CANNY,)))
    adapter_only = image_of(engine, adapter_graph(tiny_models, "sd15", (CANNY_ADAPTER,)))
    controlnet_only = image_of(engine, adapter_graph(tiny_models, "sd15", (), controls=(CANNY,)))
    plain = image_of(engine, adapter_graph(tiny_models, "sd15", ()))
    for name, other in {"adapter only": adapter_only, "ControlNet only": controlnet_only, "neither": plain}.items():
        assert (both - other).abs().max() > 1e-3, f"adapter + ControlNet gives the image of {name}"
    assert (adapter_only - plain).abs().max() > 1e-3


def test_conditioning_factor_zero_leaves_the_image_as_without_the_adapter(engine: Engine, tiny_models: Path) -> None:
    off = image_of(engine, adapter_graph(tiny_models, "sdxl", (Adapter("t2i-adapter-sdxl", "edges.png", 1.0, 0.0),)))
    assert torch.equal(off, image_of(engine, adapter_graph(tiny_models, "sdxl", ())))


def test_a_single_weights_file_loads_with_its_config(engine: Engine, tiny_models: Path) -> None:
    folder = tiny_models / "t2i-adapter-sdxl"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", images_of(engine) / "adapter.safetensors")
    from_file = adapter_graph(tiny_models, "sdxl", (Adapter("t2i-adapter-sdxl", "edges.png", 0.7),),
                              loader={"model": "adapter.safetensors", "config": str(folder)})
    from_folder = adapter_graph(tiny_models, "sdxl", (Adapter("t2i-adapter-sdxl", "edges.png", 0.7),))
    assert torch.equal(image_of(engine, from_file), image_of(engine, from_folder))
    without_config = adapter_graph(tiny_models, "sdxl", (CANNY_ADAPTER,), loader={"model": "adapter.safetensors"})
    with pytest.raises(GraphflowError, match="config input"):
        engine.run(without_config)


def test_an_sdxl_adapter_on_an_sd15_model_is_refused(engine: Engine, tiny_models: Path) -> None:
    with pytest.raises(GraphflowError, match=r"T2I-Adapter 1 .* is SDXL"):
        engine.run(adapter_graph(tiny_models, "sd15", (Adapter("t2i-adapter-sdxl", "edges.png"),)))


def test_an_adapter_guides_img2img_for_its_fraction_of_the_steps_run(engine: Engine, tiny_models: Path) -> None:
    def img2img(adapters: tuple[Adapter, ...]) -> torch.Tensor:
        return image_of(engine, adapter_graph(tiny_models, "sdxl", adapters, init_image="init.png", strength=0.5,
                                              steps=8, width=0, height=0))

    plain = img2img(())
    # 4 of the 8 steps run; a factor of 0.2 is int(0.8) = 0 of them, 0.25 the first
    assert torch.equal(img2img((Adapter("t2i-adapter-sdxl", "edges.png", 1.0, 0.2),)), plain)
    assert (img2img((Adapter("t2i-adapter-sdxl", "edges.png", 1.0, 0.25),)) - plain).abs().max() > 1e-4
