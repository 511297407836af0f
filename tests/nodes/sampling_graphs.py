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
    """Control images, an init image and a mask, SIZE x SIZE and unlike each other; odd.png is 100x84."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    edges = np.zeros((SIZE, SIZE), np.uint8)
    edges[16:48, 16], edges[16:48, 47], edges[16, 16:48], edges[47, 16:48] = 255, 255, 255, 255
    depth = ((x + y) * 255 // (2 * SIZE - 2)).astype(np.uint8)
    pose = (rng.random((SIZE, SIZE, 3)) > 0.9).astype(np.uint8) * 255
    init = np.stack([x * 4, y * 4, 255 - x * 2], axis=-1).clip(0, 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:40, 20:56] = 255
    odd = np.zeros((84, 100, 3), np.uint8)  # not a multiple of 8: the pipelines round the size down and resize
    odd[10:70:6, 5:95] = 255
    for name, pixels in {"edges": np.stack([edges] * 3, -1), "depth": np.stack([depth] * 3, -1), "pose": pose,
                         "init": init, "mask": mask, "odd": odd}.items():
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return folder


def make_engine(tiny_models: Path, folder: Path, **options: Any) -> Engine:
    """An Engine with its own model manager, reading the test images (written to folder/"in", relative paths)
    and the tiny models, writing to folder/"out"."""
    images = folder / "in"
    images.mkdir(exist_ok=True)
    return Engine(input_dirs=[write_test_images(images), tiny_models], output_dir=folder / "out",
                  models=ModelManager(), **options)


def images_of(engine: Engine) -> Path:
    return engine.paths.input_roots[0]


def sampling_graph(tiny_models: Path, checkpoint: str = "sd15", controls: tuple[Control, ...] = (CANNY,), *,
                   negative: str | None = None, init_image: str | None = None, mask_image: str | None = None,
                   mask_to: tuple[str, ...] = ("sampler",), clip_skip: int = 0, **sampler: Any) -> Graph:
    """TextEncode -> (ControlApply ...) -> Sampler -> VAEDecode through the real loaders; output "image".

    `init_image` adds VAEEncode of that file as the latent, `mask_image` a LoadMask linked to the
    VAEEncode and/or the Sampler (`mask_to`); other keywords are Sampler inputs. Node ids: sd,
    positive, negative, encode, sampler, decode.
    """
    graph = Graph("sampling")
    sd = graph.add(CheckpointLoader(model=str(tiny_models / checkpoint)), "sd")
    positive = graph.add(TextEncode(clip=sd.clip, text=PROMPT, clip_skip=clip_skip), "positive")
    inputs: dict[str, Any] = {"model": sd.model, "seed": SEED, "steps": STEPS, "positive": positive.conditioning}
    if negative is not None:
        inputs["negative"] = graph.add(TextEncode(clip=sd.clip, text=negative), "negative").conditioning
    if controls:
        inputs["control"] = [ControlApply(controlnet=ControlNetLoader(model=str(tiny_models / c.model)).controlnet,
                                          image=LoadImage(path=c.image).image, scale=c.scale, start=c.start,
                                          end=c.end).control for c in controls]
    if init_image is not None:
        encoder: dict[str, Any] = {"vae": sd.vae, "image": LoadImage(path=init_image).image}
        if mask_image is not None:
            mask = LoadMask(path=mask_image).mask
            encoder.update({"mask": mask} if "encoder" in mask_to else {})
            inputs.update({"mask": mask} if "sampler" in mask_to else {})
        inputs["latent"] = graph.add(VAEEncode(**encoder), "encode").latent
    sampled = graph.add(Sampler(**inputs | sampler), "sampler")
    graph.output("image", graph.add(VAEDecode(vae=sd.vae, latent=sampled.latent), "decode").image)
    return graph


class Pipelines:
    """diffusers pipelines over the same tiny model folders, loaded by diffusers itself (in `dtype`, on `device`)."""

    def __init__(self, tiny_models: Path, images: Path, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.tiny_models = tiny_models
        self.images = images
        self.device = device
        self.dtype = dtype

    def _prepared(self, model: Any) -> Any:
        return model.to(self.device)

    def image(self, name: str, mode: str = "RGB") -> Image.Image:
        with Image.open(self.images / name) as opened:
            return opened.convert(mode)

    @functools.cache  # noqa: B019 - one instance per test session; the cache is the point
    def controlnet(self, name: str) -> Any:
        from diffusers import ControlNetModel

        return self._prepared(ControlNetModel.from_pretrained(self.tiny_models / name, dtype=self.dtype))

    @functools.cache  # noqa: B019
    def components(self, checkpoint: str) -> dict[str, Any]:
        from diffusers import DiffusionPipeline

        options = {"safety_checker": None} if checkpoint.startswith("sd15") else {}
        pipeline = DiffusionPipeline.from_pretrained(self.tiny_models / checkpoint, dtype=self.dtype, **options)
        return {name: self._prepared(part) if isinstance(part, torch.nn.Module) else part
                for name, part in pipeline.components.items()}

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
