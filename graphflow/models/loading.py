"""Turn a located source into the MODEL / CLIP / VAE / CONTROLNET values, registering weights with the manager.

Loaders only read configs and tokenizers; weights load at a node's first `handle.use()`, so a
re-run whose TextEncode is cached never loads the text encoder. Whatever is read from a source's
files is checked afterwards to come from the files its key names (`ModelSource.check_unchanged`),
before it is registered or remembered under that key.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from graphflow.models.components import (
    Autoencoder,
    ControlNet,
    DiffusionModel,
    Family,
    TextEncoders,
    family_of_unet_config,
    vae_scale,
)
from graphflow.models.devices import Placement, torch_dtype
from graphflow.models.manager import LOAD_LOCK, ModelHandle, ModelKey, ModelManager
from graphflow.models.quantization import Quantization, QuantizationError
from graphflow.models.sources import ModelNotFoundError, ModelSource, require_safetensors, verified

# model_index.json names classes; only these are ever instantiated from it (a document is data, not code)
_COMPONENT_CLASSES = {
    "UNet2DConditionModel": "diffusers", "AutoencoderKL": "diffusers", "ControlNetModel": "diffusers",
    "T2IAdapter": "diffusers", "CLIPTextModel": "transformers", "CLIPTextModelWithProjection": "transformers",
    "CLIPTokenizer": "transformers", "CLIPTokenizerFast": "transformers",
    "CLIPVisionModelWithProjection": "transformers",
}
QUANTIZED_PARTS = ("unet", "text_encoder", "text_encoder_2")  # a checkpoint's VAE is convolutions: kept as stored
_PIPELINE_CLASSES = {
    ("sd15", False): "StableDiffusionPipeline", ("sd15", True): "StableDiffusionInpaintPipeline",
    ("sdxl", False): "StableDiffusionXLPipeline", ("sdxl", True): "StableDiffusionXLInpaintPipeline",
}


@dataclass(frozen=True)
class Checkpoint:
    model: DiffusionModel
    clip: TextEncoders
    vae: Autoencoder


def load_checkpoint(manager: ModelManager, source: ModelSource, where: Placement,
                    config: ModelSource | None = None, quantization: Quantization | None = None) -> Checkpoint:
    """A checkpoint's MODEL, CLIP and VAE from a diffusers folder or a single .safetensors file (converted with the
    configs of `config`, a diffusers checkpoint folder, when given); `quantization` applies to the UNet and the text
    encoders."""
    if source.kind == "file":
        if quantization is not None:
            raise QuantizationError(f"input quantize: '{source.name}' is a single-file checkpoint, which diffusers "
                                    "converts as a whole pipeline, and its single-file pipelines take no quantization "
                                    "config; convert it to a diffusers folder once (StableDiffusionPipeline."
                                    "from_single_file(...).save_pretrained(folder)) and load that folder quantised")
        return _single_file_checkpoint(manager, source, where, config)
    if not (source.path / "model_index.json").is_file():
        raise ModelNotFoundError(f"'{source.name}' is not a diffusers checkpoint folder: {source.path} has no "
                                 "model_index.json (a ControlNet or VAE folder goes into ControlNetLoader/VAELoader)")
    index = source.read_json("model_index.json")
    parts = [name for name in ("unet", "vae", "text_encoder", "text_encoder_2") if name in index]
    missing = {"unet", "vae", "text_encoder"} - set(parts)
    if missing:
        raise ModelNotFoundError(f"'{source.name}' lacks {', '.join(sorted(missing))}: graphflow loads SD1.5 and SDXL "
                                 "checkpoints (UNet, VAE, CLIP text encoders)")
    configs = {part: source.read_json(f"{part}/config.json") for part in parts}
    scheduler = source.read_json("scheduler/scheduler_config.json")
    tokenizers = tuple(_tokenizer(source, name) for name in ("tokenizer", "tokenizer_2") if name in index)
    source.check_unchanged()
    handles = {part: _component(manager, source, part, index[part], configs[part], where,
                                quantization=quantization if part in QUANTIZED_PARTS else None) for part in parts}
    family = family_of_unet_config(handles["unet"].config)
    clip = TextEncoders(family, source.key, tokenizers,
                        tuple(handles[name] for name in ("text_encoder", "text_encoder_2") if name in handles),
                        bool(index.get("force_zeros_for_empty_prompt", family == "sdxl")))
    return Checkpoint(DiffusionModel(family, source.key, handles["unet"], scheduler,
                                     latent_scale=vae_scale(handles["vae"].config)), clip,
                      Autoencoder(family, source.key, handles["vae"], family))


def load_controlnet(manager: ModelManager, source: ModelSource, where: Placement,
                    config: ModelSource | None = None, quantization: Quantization | None = None) -> ControlNet:
    handle = _single_model(manager, source, where, "controlnet", "ControlNetModel", "controlnet", config,
                           quantization)
    return ControlNet(family_of_unet_config(handle.config), source.key, handle)


def load_t2i_adapter(manager: ModelManager, source: ModelSource, where: Placement,
                     config: ModelSource | None = None) -> ModelHandle:
    """A T2I-Adapter: its diffusers folder (or a pipeline folder's adapter/), or a single .safetensors file of its
    weights in diffusers' layout with the config.json of `config` (diffusers converts no other layout for it)."""
    if source.kind == "file" and config is None:
        raise ModelNotFoundError(f"'{source.name}' is a single T2I-Adapter file, which holds no config: set the "
                                 "loader's config input to the T2I-Adapter folder (or hub id) it belongs to")
    return _single_model(manager, source, where, "t2i_adapter", "T2IAdapter", "adapter", config)


def load_vae(manager: ModelManager, source: ModelSource, where: Placement,
             config: ModelSource | None = None) -> Autoencoder:
    handle = _single_model(manager, source, where, "vae", "AutoencoderKL", "vae", config)
    # a checkpoint's vae/ subfolder belongs to the checkpoint's family; a VAE on its own declares none: SD1.5 and
    # SDXL VAEs share a shape, and a scaling factor is a hint (for precision rules), never a reason to refuse
    family = None
    if source.kind != "file" and (source.path / "model_index.json").is_file() and \
            (source.path / "unet" / "config.json").is_file():
        family = family_of_unet_config(source.read_json("unet/config.json"))
    return Autoencoder(family, source.key, handle, family or vae_family(handle.config))


def load_clip_vision(manager: ModelManager, source: ModelSource, where: Placement) -> tuple[ModelHandle, Any]:
    """(the encoder's handle, its image processor) of a transformers CLIPVisionModelWithProjection folder: config.json,
    model.safetensors and, when present, preprocessor_config.json (else CLIP's standard preprocessing at the model's
    image size, as diffusers' `load_ip_adapter` makes it for a pipeline without a feature extractor)."""
    if source.kind == "file" or not (source.path / "config.json").is_file():
        raise ModelNotFoundError(f"'{source.name}' is not a CLIP vision model folder: it needs the config.json and "
                                 "model.safetensors that CLIPVisionModelWithProjection.save_pretrained writes")
    config = source.read_json("config.json")
    if config.get("model_type") != "clip_vision_model":
        raise ModelNotFoundError(f"'{source.name}' is a {config.get('model_type')!r} model, not a CLIP vision model "
                                 "(model_type 'clip_vision_model', e.g. an IP-Adapter's image_encoder folder)")
    processor = _image_processor(source, int(config.get("image_size", 224)))
    source.check_unchanged()
    handle = _component(manager, source, "", ["transformers", "CLIPVisionModelWithProjection"], config, where,
                        kind="clip_vision")
    return handle, processor


@lru_cache(maxsize=8)
def _image_processor(source: ModelSource, image_size: int) -> Any:
    from transformers import CLIPImageProcessor

    if (source.path / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(str(source.path))
    return CLIPImageProcessor(size=image_size, crop_size=image_size)


def vae_family(config: dict[str, Any]) -> Family | None:
    """The family whose VAEs use this latent scaling factor (SD1.5 and SDXL VAEs share a shape); None for others."""
    factor = float(config.get("scaling_factor", 0.18215))
    return "sd15" if abs(factor - 0.18215) < 1e-6 else "sdxl" if abs(factor - 0.13025) < 1e-6 else None


def _single_model(manager: ModelManager, source: ModelSource, where: Placement, kind: str, class_name: str,
                  subfolder: str, config: ModelSource | None,
                  quantization: Quantization | None = None) -> ModelHandle:
    """A ControlNet or VAE: its own folder, the matching subfolder of a checkpoint folder, or a single file."""
    if source.kind == "file":
        load = verified(partial(_from_single_file, class_name, str(source.path), where.dtype,
                                str(config.path) if config else None, **_quantizing(quantization)),
                        source, *_sources(config))
        key = ModelKey(kind, _with_config(source, config), "", where.dtype, where.device, _quantized(quantization))
        handle = manager.handle(key, load)
        # a single file carries no config.json: load now, so the config (family, scaling factor) is known
        # and a file that cannot be converted fails in its loader node rather than in a later Sampler
        with handle.use() as module:
            handle.config.update(module.config)
        return handle
    sub = subfolder if (source.path / "model_index.json").is_file() else ""
    if not (source.path / sub / "config.json").is_file():
        raise ModelNotFoundError(f"'{source.name}' is not a diffusers {kind} folder: no config.json in "
                                 f"{source.path / sub}")
    config_json = source.read_json(f"{sub}/config.json" if sub else "config.json")
    source.check_unchanged()
    return _component(manager, source, sub, ["diffusers", class_name], config_json, where, kind=kind,
                      quantization=quantization)


def _sources(config: ModelSource | None) -> tuple[ModelSource, ...]:
    return () if config is None else (config,)


def _with_config(source: ModelSource, config: ModelSource | None) -> str:
    """The key of a single-file model converted with `config`'s configs: a different config is a different model."""
    return source.key if config is None else f"{source.key} with config {config.key}"


def _quantized(quantization: Quantization | None) -> str:
    """What a ModelKey holds of a quantization: its name, "" for none."""
    return "" if quantization is None else str(quantization)


def _quantizing(quantization: Quantization | None) -> dict[str, Quantization]:
    """The keyword a load function takes a quantization by; none for the weights as stored."""
    return {} if quantization is None else {"quantization": quantization}


def _component(manager: ModelManager, source: ModelSource, subfolder: str, declared: Any, config: dict[str, Any],
               where: Placement, kind: str | None = None, quantization: Quantization | None = None) -> ModelHandle:
    """The handle of one diffusers component; `config` is its config.json, read (and checked) by the caller."""
    class_name = declared[1] if isinstance(declared, list) and len(declared) == 2 else None
    if class_name not in _COMPONENT_CLASSES:
        raise ModelNotFoundError(f"'{source.name}': component '{subfolder}' is a {class_name!r}, which graphflow "
                                 f"does not load (supported: {', '.join(sorted(_COMPONENT_CLASSES))})")
    folder = source.path / subfolder
    require_safetensors(folder, f"'{source.name}' {subfolder or kind}")
    load = verified(partial(_from_pretrained, class_name, str(source.path), subfolder, where.dtype,
                            **_quantizing(quantization)), source)
    key = ModelKey(kind or subfolder, source.key, subfolder, where.dtype, where.device, _quantized(quantization))
    return manager.handle(key, load, config)


def _model_class(class_name: str) -> Any:
    import importlib

    return getattr(importlib.import_module(_COMPONENT_CLASSES[class_name]), class_name)


@contextmanager
def quiet_progress() -> Iterator[None]:
    """Hold while a library builds or loads a model: one build at a time in the process (they patch process globals,
    see LOAD_LOCK), with transformers' per-file progress bars hidden (graphflow reports progress per node instead).
    Taking turns is also what keeps the progress-bar flag, one global, right."""
    from transformers.utils import logging as transformers_logging

    with LOAD_LOCK:
        was_enabled = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            yield
        finally:
            if was_enabled:
                transformers_logging.enable_progress_bar()


def _from_pretrained(class_name: str, folder: str, subfolder: str, dtype: str,
                     quantization: Quantization | None = None) -> Any:
    kwargs: dict[str, Any] = {"subfolder": subfolder} if subfolder else {}
    if quantization is not None:
        kwargs["quantization_config"] = quantization.config(_COMPONENT_CLASSES[class_name])
    with quiet_progress():
        return _model_class(class_name).from_pretrained(folder, dtype=torch_dtype(dtype), use_safetensors=True,
                                                        **kwargs)


def _from_single_file(class_name: str, path: str, dtype: str, config: str | None,
                      quantization: Quantization | None = None) -> Any:
    model_class = _model_class(class_name)
    if not hasattr(model_class, "from_single_file"):  # no original layout to convert: the file holds its weights
        if quantization is not None:
            raise QuantizationError(f"input quantize: a single-file {class_name} cannot be loaded quantised; load "
                                    "its diffusers folder instead")
        return _from_weights_file(model_class, path, dtype, config)
    extra = {} if quantization is None else {"quantization_config": quantization.config("diffusers")}
    return _convert_single_file(model_class, path, dtype, config, **extra)


def _from_weights_file(model_class: Any, path: str, dtype: str, config: str | None) -> Any:
    """A model built from `config`'s config.json and given the weights of the .safetensors file at `path`."""
    from safetensors.torch import load_file

    try:
        with quiet_progress():
            model = model_class.from_config(model_class.load_config(config))
            model.load_state_dict(load_file(path))
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelNotFoundError(f"could not load {path} as a {model_class.__name__} with the config in '{config}' "
                                 f"({type(error).__name__}: {error}); the file must hold the weights of a model with "
                                 "that config, in diffusers' layout") from error
    return model.to(torch_dtype(dtype)).eval()


def _convert_single_file(model_class: Any, path: str, dtype: str, config: str | None, **extra: Any) -> Any:
    """diffusers' single-file conversion; a file it cannot convert says what conversion needs."""
    try:
        with quiet_progress():
            return model_class.from_single_file(path, config=config, dtype=torch_dtype(dtype), **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        needs = (f"the configs in '{config}'" if config else
                 "the standard configs from the Hugging Face hub (or its cache); with the hub out of reach, set the "
                 "loader's config input to a local diffusers folder of the same architecture")
        raise ModelNotFoundError(f"could not load the single-file model {path} ({type(error).__name__}: {error}). "
                                 f"Converting a single file needs {needs}.") from error


@lru_cache(maxsize=8)
def _tokenizer(source: ModelSource, subfolder: str) -> Any:
    """A checkpoint's tokenizer, remembered by its source (whose fingerprint changes when its files do)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(source.path), subfolder=subfolder)
    source.check_unchanged()
    return tokenizer


def _single_file_checkpoint(manager: ModelManager, source: ModelSource, where: Placement,
                            config: ModelSource | None) -> Checkpoint:
    """An original-layout (LDM) .safetensors checkpoint, converted by diffusers' single-file loader."""
    family, inpaint = checkpoint_family(source.path)
    with _CONVERTING:  # two loaders asking at once: the second waits for the first's conversion, then reuses it
        pipeline = _single_file_pipeline(source, family, inpaint, where.dtype, config, where.device)
    key = _with_config(source, config)

    def handle(kind: str, part: str) -> ModelHandle:
        module = getattr(pipeline, part)
        return manager.handle(ModelKey(kind, key, part, where.dtype, where.device), lambda: module,
                              dict(module.config))

    encoders = tuple(handle("text_encoder", name) for name in ("text_encoder", "text_encoder_2")
                     if getattr(pipeline, name, None) is not None)
    tokenizers = tuple(getattr(pipeline, name) for name in ("tokenizer", "tokenizer_2")
                       if getattr(pipeline, name, None) is not None)
    clip = TextEncoders(family, source.key, tokenizers, encoders, family == "sdxl")
    vae = handle("vae", "vae")
    return Checkpoint(DiffusionModel(family, source.key, handle("unet", "unet"), dict(pipeline.scheduler.config),
                                     latent_scale=vae_scale(vae.config)),
                      clip, Autoencoder(family, source.key, vae, family))


_CONVERTING = threading.Lock()


@lru_cache(maxsize=2)
def _single_file_pipeline(source: ModelSource, family: Family, inpaint: bool, dtype: str,
                          config: ModelSource | None, device: str) -> Any:
    """The converted pipeline, remembered by its sources (whose fingerprints change with their contents), so two
    loader nodes naming one file convert it once, and a replaced file is converted anew. One per `device`: its
    modules are what the handles hold, and the manager moves them to their handle's device."""
    import diffusers

    extra = {"safety_checker": None} if family == "sd15" else {}
    convert = partial(_convert_single_file, getattr(diffusers, _PIPELINE_CLASSES[family, inpaint]), str(source.path),
                      dtype, str(config.path) if config else None, **extra)
    return verified(convert, source, *_sources(config))()


def checkpoint_family(path: Path) -> tuple[Family, bool]:
    """(family, inpainting) of an original-layout checkpoint, read from its tensor names and the UNet's first conv."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        names = set(file.keys())
        first_conv = "model.diffusion_model.input_blocks.0.0.weight"
        if first_conv not in names:
            raise ModelNotFoundError(f"'{path}' is not an SD1.5 or SDXL checkpoint in the original single-file layout "
                                     f"(no {first_conv}); give a diffusers folder instead")
        in_channels = file.get_slice(first_conv).get_shape()[1]
    family: Family = "sdxl" if any(name.startswith("conditioner.embedders.1.") for name in names) else "sd15"
    return family, in_channels == 9
