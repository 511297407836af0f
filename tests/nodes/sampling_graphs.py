"""Sampling graphs on the tiny models, and the diffusers pipelines they must match, for the sampling tests."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from graphflow import Engine, Graph
from graphflow.models import ModelManager
from nodes import (
    CheckpointLoader,
    ControlApply,
    ControlNetLoader,
    LoadImage,
    LoadMask,
    Sampler,
    TextEncode,
    VAEDecode,
    VAEEncode,
)
from nodes.imaging import to_uint8

PROMPT = "a cosy reading corner, warm light"
SEED = 7
STEPS = 3
SIZE = 64


@dataclass(frozen=True)
class Control:
    """One ControlApply: a tiny ControlNet folder, a test image and the window."""

    model: str
    image: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


CANNY = Control("controlnet-canny", "edges.png")


def write_test_images(folder: Path) -> Path:
    """Control images, an init image and a mask, all SIZE x SIZE, unlike each other."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    edges = np.zeros((SIZE, SIZE), np.uint8)
    edges[16:48, 16], edges[16:48, 47], edges[16, 16:48], edges[47, 16:48] = 255, 255, 255, 255
    depth = ((x + y) * 255 // (2 * SIZE - 2)).astype(np.uint8)
    pose = (rng.random((SIZE, SIZE, 3)) > 0.9).astype(np.uint8) * 255
    init = np.stack([x * 4, y * 4, 255 - x * 2], axis=-1).clip(0, 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:40, 20:56] = 255
    for name, pixels in {"edges": np.stack([edges] * 3, -1), "depth": np.stack([depth] * 3, -1), "pose": pose,
                         "init": init, "mask": mask}.items():
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return folder


def make_engine(images: Path, tiny_models: Path, output: Path) -> Engine:
    """An Engine reading the test images (relative paths) and the tiny models, with its own model manager."""
    return Engine(input_dirs=[images, tiny_models], output_dir=output, models=ModelManager())


def sampling_graph(tiny_models: Path, checkpoint: str = "sd15", controls: tuple[Control, ...] = (CANNY,), *,
                   negative: str | None = None, init: str | None = None, mask: str | None = None,
                   mask_to: tuple[str, ...] = ("sampler",), clip_skip: int = 0, latent: Any = None,
                   **sampler: Any) -> Graph:
    """TextEncode -> (ControlApply ...) -> Sampler -> VAEDecode through the real loaders; output "image"."""
    graph = Graph("sampling")
    sd = CheckpointLoader(model=str(tiny_models / checkpoint))
    inputs: dict[str, Any] = {"model": sd.model, "seed": SEED, "steps": STEPS,
                              "positive": TextEncode(clip=sd.clip, text=PROMPT, clip_skip=clip_skip).conditioning}
    if negative is not None:
        inputs["negative"] = TextEncode(clip=sd.clip, text=negative).conditioning
    if controls:
        inputs["control"] = [ControlApply(controlnet=ControlNetLoader(model=str(tiny_models / c.model)).controlnet,
                                          image=LoadImage(path=c.image).image, scale=c.scale, start=c.start,
                                          end=c.end).control for c in controls]
    if init is not None:
        encoder: dict[str, Any] = {"vae": sd.vae, "image": LoadImage(path=init).image}
        if mask is not None:
            loaded = LoadMask(path=mask).mask
            encoder.update({"mask": loaded} if "encoder" in mask_to else {})
            inputs.update({"mask": loaded} if "sampler" in mask_to else {})
        inputs["latent"] = VAEEncode(**encoder).latent
    elif latent is not None:
        inputs["latent"] = latent
    decode = graph.add(VAEDecode(vae=sd.vae, latent=graph.add(Sampler(**inputs | sampler), "sampler").latent))
    graph.output("image", decode.image)
    return graph


class Pipelines:
    """diffusers pipelines over the same tiny model folders, loaded by diffusers itself."""

    def __init__(self, tiny_models: Path, images: Path) -> None:
        self.tiny_models = tiny_models
        self.images = images

    def image(self, name: str, mode: str = "RGB") -> Image.Image:
        with Image.open(self.images / name) as opened:
            return opened.convert(mode)

    @functools.cache  # noqa: B019 - one instance per test session; the cache is the point
    def controlnet(self, name: str) -> Any:
        from diffusers import ControlNetModel

        return ControlNetModel.from_pretrained(self.tiny_models / name)

    @functools.cache  # noqa: B019
    def components(self, checkpoint: str) -> dict[str, Any]:
        from diffusers import DiffusionPipeline

        pipeline = DiffusionPipeline.from_pretrained(self.tiny_models / checkpoint, safety_checker=None)
        return dict(pipeline.components)

    def pipeline(self, class_name: str, checkpoint: str = "sd15", controls: tuple[Control, ...] = (CANNY,),
                 scheduler: tuple[str, dict[str, Any]] | None = None) -> Any:
        """A pipeline of `class_name`; `scheduler` (class name, extra config) swaps the checkpoint's one out."""
        import diffusers

        components = self.components(checkpoint)
        pipeline_class = getattr(diffusers, class_name)
        modules, options = pipeline_class._get_signature_keys(pipeline_class)
        parts = {name: value for name, value in components.items() if name in modules}
        own_scheduler = components["scheduler"]
        # a fresh scheduler per pipeline (they keep state), made as users swap them: X.from_config(config)
        scheduler_name, extra = (type(own_scheduler).__name__, {}) if scheduler is None else scheduler
        parts["scheduler"] = getattr(diffusers, scheduler_name).from_config(own_scheduler.config, **extra)
        if controls:
            nets = [self.controlnet(control.model) for control in controls]
            parts["controlnet"] = nets[0] if len(nets) == 1 else nets
        parts.update({name: False for name in ("add_watermarker", "requires_safety_checker") if name in options})
        pipeline = pipeline_class(**parts)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def run(self, pipeline: Any, controls: tuple[Control, ...] = (CANNY,), control_key: str = "image",
            **arguments: Any) -> np.ndarray:
        """The pipeline's float image (output_type="np") for PROMPT, SEED and STEPS on a CPU generator."""
        if controls:
            images = [self.image(control.image) for control in controls]
            arguments[control_key] = images[0] if len(images) == 1 else images
            arguments["controlnet_conditioning_scale"] = [c.scale for c in controls] if len(controls) > 1 \
                else controls[0].scale
            arguments["control_guidance_start"] = [c.start for c in controls]
            arguments["control_guidance_end"] = [c.end for c in controls]
        arguments.setdefault("prompt", PROMPT)
        arguments.setdefault("num_inference_steps", STEPS)
        arguments.setdefault("guidance_scale", 7.5)  # the Sampler's default; SDXL pipelines default to 5
        return pipeline(generator=torch.Generator("cpu").manual_seed(arguments.pop("seed", SEED)), output_type="np",
                        **arguments).images


def compare(case: str, ours: torch.Tensor, theirs: np.ndarray) -> tuple[float, bool]:
    """(float max abs diff, uint8 images equal) of a graph's IMAGE and a pipeline's np output; printed as a row."""
    difference = float(np.abs(ours.numpy() - theirs).max())
    same = bool(np.array_equal(to_uint8(ours), (theirs * 255).round().astype(np.uint8)))
    print(f"\nparity | {case} | max abs diff {difference:.3g} | uint8 equal {same}")
    return difference, same
