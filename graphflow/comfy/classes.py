"""The ComfyUI node classes graphflow imports: their inputs, widgets and outputs as ComfyUI declares them.

One table serves the importer (which inputs are links, which are widget values and in what order the UI
format lists them) and the ComfyUI-compatible server (`comfy_class_info`, the answer of `GET /object_info`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphflow.comfy.samplers import COMFY_SAMPLERS, COMFY_SCHEDULERS

MAX_RESOLUTION = 16384
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF
# ComfyUI's scalar widget types; every other type name is a link between nodes
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
# the models folders of ComfyUI's layout, by the kind of file a widget names
MODEL_FOLDERS = {"checkpoints": "checkpoints", "controlnet": "controlnet", "loras": "loras", "vae": "vae"}
MODEL_SUFFIXES = (".safetensors", ".sft")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


@dataclass(frozen=True)
class ComfyInput:
    """One input of a ComfyUI class: a link of `type`, or a widget (INT, FLOAT, STRING, BOOLEAN, COMBO)."""

    name: str
    type: str
    options: Mapping[str, Any] = field(default_factory=dict)  # default, min, max, step, multiline, ...
    choices: tuple[str, ...] = ()  # a COMBO's fixed choices
    files: str | None = None  # a COMBO of file names: the models folder ("checkpoints", ...) or "input"
    optional: bool = False
    control_after_generate: bool = False  # the UI lists one more widget value (fixed/randomize/...) after it

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    @property
    def default(self) -> Any:
        if "default" in self.options:
            return self.options["default"]
        return self.choices[0] if self.choices else None


@dataclass(frozen=True)
class ComfyClass:
    """A ComfyUI node class as `GET /object_info` describes it."""

    name: str
    display_name: str
    category: str
    inputs: tuple[ComfyInput, ...]
    outputs: tuple[str, ...] = ()
    output_names: tuple[str, ...] | None = None  # None: the output types
    output_node: bool = False
    description: str = ""

    def input(self, name: str) -> ComfyInput | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    @property
    def widgets(self) -> tuple[ComfyInput, ...]:
        return tuple(spec for spec in self.inputs if spec.is_widget)


def _link(name: str, type: str, optional: bool = False) -> ComfyInput:
    return ComfyInput(name, type, optional=optional)


def _int(name: str, default: int, low: int, high: int, step: int = 1, **more: Any) -> ComfyInput:
    return ComfyInput(name, "INT", {"default": default, "min": low, "max": high, "step": step}, **more)


def _float(name: str, default: float, low: float, high: float, step: float = 0.01) -> ComfyInput:
    return ComfyInput(name, "FLOAT", {"default": default, "min": low, "max": high, "step": step})


def _combo(name: str, choices: tuple[str, ...]) -> ComfyInput:
    return ComfyInput(name, "COMBO", choices=choices)


def _files(name: str, folder: str, **options: Any) -> ComfyInput:
    return ComfyInput(name, "COMBO", options, files=folder)


_IMAGE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
_LATENT_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
_CROPS = ("disabled", "center")


def _sampler_inputs(advanced: bool) -> tuple[ComfyInput, ...]:
    seed = "noise_seed" if advanced else "seed"
    head = (_link("model", "MODEL"),) + ((_combo("add_noise", ("enable", "disable")),) if advanced else ())
    middle = (_int(seed, 0, 0, MAX_SEED, control_after_generate=True), _int("steps", 20, 1, 10000),
              _float("cfg", 8.0, 0.0, 100.0, 0.1), _combo("sampler_name", COMFY_SAMPLERS),
              _combo("scheduler", COMFY_SCHEDULERS), _link("positive", "CONDITIONING"),
              _link("negative", "CONDITIONING"), _link("latent_image", "LATENT"))
    tail = (_int("start_at_step", 0, 0, 10000), _int("end_at_step", 10000, 0, 10000),
            _combo("return_with_leftover_noise", ("disable", "enable"))) if advanced \
        else (_float("denoise", 1.0, 0.0, 1.0),)
    return head + middle + tail


_CLASSES = (
    ComfyClass("CheckpointLoaderSimple", "Load Checkpoint", "loaders", (_files("ckpt_name", "checkpoints"),),
               ("MODEL", "CLIP", "VAE")),
    ComfyClass("VAELoader", "Load VAE", "loaders", (_files("vae_name", "vae"),), ("VAE",)),
    ComfyClass("LoraLoader", "Load LoRA", "loaders",
               (_link("model", "MODEL"), _link("clip", "CLIP"), _files("lora_name", "loras"),
                _float("strength_model", 1.0, -100.0, 100.0), _float("strength_clip", 1.0, -100.0, 100.0)),
               ("MODEL", "CLIP")),
    ComfyClass("ControlNetLoader", "Load ControlNet Model", "loaders", (_files("control_net_name", "controlnet"),),
               ("CONTROL_NET",)),
    ComfyClass("CLIPTextEncode", "CLIP Text Encode (Prompt)", "conditioning",
               (ComfyInput("text", "STRING", {"multiline": True, "dynamicPrompts": True}), _link("clip", "CLIP")),
               ("CONDITIONING",)),
    ComfyClass("CLIPSetLastLayer", "CLIP Set Last Layer", "conditioning",
               (_link("clip", "CLIP"), _int("stop_at_clip_layer", -1, -24, -1)), ("CLIP",)),
    ComfyClass("ControlNetApply", "Apply ControlNet (OLD)", "conditioning/controlnet",
               (_link("conditioning", "CONDITIONING"), _link("control_net", "CONTROL_NET"), _link("image", "IMAGE"),
                _float("strength", 1.0, 0.0, 10.0)), ("CONDITIONING",)),
    ComfyClass("ControlNetApplyAdvanced", "Apply ControlNet", "conditioning/controlnet",
               (_link("positive", "CONDITIONING"), _link("negative", "CONDITIONING"),
                _link("control_net", "CONTROL_NET"), _link("image", "IMAGE"), _float("strength", 1.0, 0.0, 10.0),
                _float("start_percent", 0.0, 0.0, 1.0, 0.001), _float("end_percent", 1.0, 0.0, 1.0, 0.001),
                _link("vae", "VAE", optional=True)),
               ("CONDITIONING", "CONDITIONING"), ("positive", "negative")),
    ComfyClass("KSampler", "KSampler", "sampling", _sampler_inputs(advanced=False), ("LATENT",)),
    ComfyClass("KSamplerAdvanced", "KSampler (Advanced)", "sampling", _sampler_inputs(advanced=True), ("LATENT",)),
    ComfyClass("EmptyLatentImage", "Empty Latent Image", "latent",
               (_int("width", 512, 16, MAX_RESOLUTION, 8), _int("height", 512, 16, MAX_RESOLUTION, 8),
                _int("batch_size", 1, 1, 4096)), ("LATENT",)),
    ComfyClass("VAEDecode", "VAE Decode", "latent", (_link("samples", "LATENT"), _link("vae", "VAE")), ("IMAGE",)),
    ComfyClass("VAEEncode", "VAE Encode", "latent", (_link("pixels", "IMAGE"), _link("vae", "VAE")), ("LATENT",)),
    ComfyClass("VAEEncodeForInpaint", "VAE Encode (for Inpainting)", "latent/inpaint",
               (_link("pixels", "IMAGE"), _link("vae", "VAE"), _link("mask", "MASK"),
                _int("grow_mask_by", 6, 0, 64)), ("LATENT",)),
    ComfyClass("SetLatentNoiseMask", "Set Latent Noise Mask", "latent/inpaint",
               (_link("samples", "LATENT"), _link("mask", "MASK")), ("LATENT",)),
    ComfyClass("LatentUpscale", "Upscale Latent", "latent",
               (_link("samples", "LATENT"), _combo("upscale_method", _LATENT_METHODS),
                _int("width", 512, 0, MAX_RESOLUTION, 8), _int("height", 512, 0, MAX_RESOLUTION, 8),
                _combo("crop", _CROPS)), ("LATENT",)),
    ComfyClass("LatentUpscaleBy", "Upscale Latent By", "latent",
               (_link("samples", "LATENT"), _combo("upscale_method", _LATENT_METHODS),
                _float("scale_by", 1.5, 0.01, 8.0)), ("LATENT",)),
    ComfyClass("LoadImage", "Load Image", "image", (_files("image", "input", image_upload=True),),
               ("IMAGE", "MASK")),
    ComfyClass("LoadImageMask", "Load Image (as Mask)", "mask",
               (_files("image", "input", image_upload=True), _combo("channel", ("alpha", "red", "green", "blue"))),
               ("MASK",)),
    ComfyClass("SaveImage", "Save Image", "image",
               (_link("images", "IMAGE"), ComfyInput("filename_prefix", "STRING", {"default": "ComfyUI"})),
               output_node=True),
    ComfyClass("PreviewImage", "Preview Image", "image", (_link("images", "IMAGE"),), output_node=True),
    ComfyClass("ImageScale", "Upscale Image", "image/upscaling",
               (_link("image", "IMAGE"), _combo("upscale_method", _IMAGE_METHODS),
                _int("width", 512, 0, MAX_RESOLUTION), _int("height", 512, 0, MAX_RESOLUTION),
                _combo("crop", _CROPS)), ("IMAGE",)),
    ComfyClass("ImageScaleBy", "Upscale Image By", "image/upscaling",
               (_link("image", "IMAGE"), _combo("upscale_method", _IMAGE_METHODS),
                _float("scale_by", 1.0, 0.01, 8.0)), ("IMAGE",)),
    ComfyClass("InvertMask", "InvertMask", "mask", (_link("mask", "MASK"),), ("MASK",)),
    ComfyClass("ThresholdMask", "ThresholdMask", "mask", (_link("mask", "MASK"), _float("value", 0.5, 0.0, 1.0)),
               ("MASK",)),
    ComfyClass("GrowMask", "GrowMask", "mask",
               (_link("mask", "MASK"), _int("expand", 0, -MAX_RESOLUTION, MAX_RESOLUTION),
                ComfyInput("tapered_corners", "BOOLEAN", {"default": True})), ("MASK",)),
    ComfyClass("ImageToMask", "Convert Image to Mask", "mask",
               (_link("image", "IMAGE"), _combo("channel", ("red", "green", "blue", "alpha"))), ("MASK",)),
    *(ComfyClass(name, name.removeprefix("Primitive") if name != "PrimitiveStringMultiline" else "String (Multiline)",
                 "utils/primitive", (ComfyInput("value", kind, options, control_after_generate=kind == "INT"),),
                 (kind,))
      for name, kind, options in (
          ("PrimitiveInt", "INT", {"default": 0, "min": -MAX_SEED // 2 - 1, "max": MAX_SEED // 2}),
          ("PrimitiveFloat", "FLOAT", {"default": 0.0}), ("PrimitiveString", "STRING", {"default": ""}),
          ("PrimitiveStringMultiline", "STRING", {"default": "", "multiline": True}),
          ("PrimitiveBoolean", "BOOLEAN", {"default": False}))),
    ComfyClass("Canny", "Canny", "image/preprocessors",
               (_link("image", "IMAGE"), _float("low_threshold", 0.4, 0.01, 0.99),
                _float("high_threshold", 0.8, 0.01, 0.99)), ("IMAGE",)),
)

COMFY_CLASSES: dict[str, ComfyClass] = {spec.name: spec for spec in _CLASSES}
# ComfyUI's constant nodes: their value is folded into the widgets they feed
PRIMITIVES = frozenset(name for name in COMFY_CLASSES if name.startswith("Primitive"))


def folder_files(root: Path | None, folder: str) -> list[str]:
    """What ComfyUI would list for one of its folders, `root` (a models folder such as checkpoints/ when `folder`
    names one, its input folder for "input"): model files and whole diffusers folders, or images; sorted,
    relative to `root` with '/' between parts."""
    if root is None or not root.is_dir():
        return []
    suffixes = IMAGE_SUFFIXES if folder == "input" else MODEL_SUFFIXES
    names: list[str] = []
    for directory, folders, files in os.walk(root):
        here = Path(directory)
        for name in sorted(folders):
            if folder != "input" and ((here / name / "model_index.json").is_file()
                                      or (here / name / "config.json").is_file()):
                names.append((here / name).relative_to(root).as_posix())  # a diffusers folder: listed whole
        folders[:] = sorted(name for name in folders if (here / name).relative_to(root).as_posix() not in names)
        names.extend((here / name).relative_to(root).as_posix() for name in sorted(files)
                     if name.lower().endswith(suffixes))
    return sorted(names)


def comfy_class_info(models_dir: Path | None = None, input_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every mapped class in the shape of ComfyUI's `GET /object_info`; file lists come from `models_dir`
    (ComfyUI's models layout) and `input_dir` (images)."""
    return {name: _class_info(spec, models_dir, input_dir) for name, spec in COMFY_CLASSES.items()}


def _class_info(spec: ComfyClass, models_dir: Path | None, input_dir: Path | None) -> dict[str, Any]:
    required: dict[str, Any] = {}
    optional: dict[str, Any] = {}
    for item in spec.inputs:
        (optional if item.optional else required)[item.name] = _input_info(item, models_dir, input_dir)
    options = {"required": required, **({"optional": optional} if optional else {})}
    names = spec.output_names if spec.output_names is not None else spec.outputs
    return {"input": options, "input_order": {key: list(value) for key, value in options.items()},
            "output": list(spec.outputs), "output_is_list": [False] * len(spec.outputs), "output_name": list(names),
            "name": spec.name, "display_name": spec.display_name, "description": spec.description,
            "python_module": "graphflow.comfy", "category": spec.category, "output_node": spec.output_node}


def _input_info(item: ComfyInput, models_dir: Path | None, input_dir: Path | None) -> list[Any]:
    if item.files is not None:
        root = input_dir if item.files == "input" else models_dir / item.files if models_dir is not None else None
        names = folder_files(root, item.files)
        return [names, dict(item.options)] if item.options else [names]
    if item.type == "COMBO":
        return [list(item.choices)]
    options = dict(item.options)
    if item.control_after_generate:
        options["control_after_generate"] = True
    return [item.type, options] if options else [item.type]
