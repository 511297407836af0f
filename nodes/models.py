"""Model loaders: CheckpointLoader, ControlNetLoader, VAELoader.

Each outputs handles to models held by the process's ModelManager: a model is loaded once per
(source, dtype, device, quantization) however many nodes, graphs and runs name it, and its weights load when a
node first needs them, not when the loader runs. The values they output also carry the run's torch.compile
choice for each component (graphflow.models.compilation), which is why they key the `compile_*` options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from graphflow.context import RunContext
from graphflow.models.compilation import compilation
from graphflow.models.quantization import BACKENDS, MODES, quantization
from graphflow.node import Input, Node, Output
from graphflow.types import CLIP, CONTROLNET, MODEL, STRING, VAE

_SOURCE = ("A Hugging Face hub id (downloaded to the HF cache on first use), a local diffusers folder, or a single "
           ".safetensors file; local paths are relative to the input directory. Pickle formats (.ckpt, .bin, .pt) "
           "are refused.")
_CONFIG = ("Single .safetensors files only: a hub id or local diffusers folder (relative to the input directory) whose "
           "configs describe the model (a checkpoint's for CheckpointLoader, the model's config.json otherwise; "
           "empty: diffusers picks the standard one, which needs the hub or the HF cache).")


def _quantize(parts: str) -> Input:
    return Input("quantize", STRING, f"Store the weights of the {parts} in fewer bits: int8, int4 or fp8 (weight-only; "
                 "linear layers only, convolutions stay as stored) or nf4 (bitsandbytes, CUDA only). Saves memory and "
                 "changes pixels a little.", default="none", choices=MODES)


_BACKEND = Input("quantize_backend", STRING, "Who quantises: torchao or quanto (optimum-quanto; both the "
                 "graphflow[quantize] extra, CPU and GPU), bitsandbytes (CUDA only); auto: torchao, else quanto, "
                 "bitsandbytes for nf4.", default="auto", choices=BACKENDS)


def _load(ctx: RunContext, model: str, config: str, load: Callable[..., Any], *, pipeline: bool = False,
          quantize: tuple[str, str] | None = None) -> Any:
    """`load` (a graphflow.models.loading function) applied to the located source and config source, on the engine's
    device/dtype, quantised as `quantize` (mode, backend) asks. The config is located like a model (its files too
    stay inside the roots), configs only."""
    from graphflow.models import placement
    from graphflow.models.sources import MODEL_CONFIG_FILES, PIPELINE_CONFIG_FILES, locate

    where = placement(ctx.options)
    extra = {} if quantize is None else {"quantization": quantization(*quantize, where.device)}
    source = locate(model, ctx.paths, node=ctx.node, input="model", pipeline=pipeline)
    files = PIPELINE_CONFIG_FILES if pipeline else MODEL_CONFIG_FILES
    configs = locate(config, ctx.paths, node=ctx.node, input="config", files=files) if config.strip() else None
    return load(ctx.models, source, where, configs, **extra)


class CheckpointLoader(Node):
    """Load an SD1.5 or SDXL checkpoint (inpainting ones too) as its denoising MODEL, CLIP text encoders and VAE."""

    category = "models"
    # compiled modules may differ from eager ones in the last bits: the values carry the choice, so it is keyed
    uses_options = ("device", "dtype", "compile_unet", "compile_text_encoder", "compile_vae")
    inputs = (
        Input("model", STRING, _SOURCE, model=True),
        Input("config", STRING, _CONFIG, default="", model=True),
        _quantize("UNet and text encoders"),
        _BACKEND,
    )
    outputs = (
        Output("model", MODEL, "The UNet and its scheduler settings, for Sampler."),
        Output("clip", CLIP, "The text encoder(s) and tokenizer(s), for TextEncode."),
        Output("vae", VAE, "The autoencoder, for VAEEncode and VAEDecode."),
    )

    def run(self, ctx: RunContext, model: str, config: str, quantize: str, quantize_backend: str) -> dict[str, Any]:
        from graphflow.models.loading import load_checkpoint

        checkpoint = _load(ctx, model, config, load_checkpoint, pipeline=True, quantize=(quantize, quantize_backend))
        return {"model": replace(checkpoint.model, compile=compilation(ctx.options, "unet")),
                "clip": replace(checkpoint.clip, compile=compilation(ctx.options, "text_encoder")),
                "vae": replace(checkpoint.vae, compile=compilation(ctx.options, "vae"))}


class ControlNetLoader(Node):
    """Load a ControlNet (SD1.5 or SDXL), e.g. lllyasviel/sd-controlnet-canny."""

    category = "models"
    uses_options = ("device", "dtype", "compile_controlnet")
    inputs = (
        Input("model", STRING, _SOURCE, model=True),
        Input("config", STRING, _CONFIG, default="", model=True),
        _quantize("ControlNet"),
        _BACKEND,
    )
    outputs = (Output("controlnet", CONTROLNET, "The ControlNet, for ControlApply."),)

    def run(self, ctx: RunContext, model: str, config: str, quantize: str, quantize_backend: str) -> dict[str, Any]:
        from graphflow.models.loading import load_controlnet

        controlnet = _load(ctx, model, config, load_controlnet, quantize=(quantize, quantize_backend))
        return {"controlnet": replace(controlnet, compile=compilation(ctx.options, "controlnet"))}


class VAELoader(Node):
    """Load a separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix, to use instead of a checkpoint's own."""

    category = "models"
    uses_options = ("device", "dtype", "compile_vae")
    inputs = (
        Input("model", STRING, _SOURCE + " A checkpoint folder gives its vae/ subfolder.", model=True),
        Input("config", STRING, _CONFIG, default="", model=True),
    )
    outputs = (Output("vae", VAE, "The autoencoder, for VAEEncode and VAEDecode."),)

    def run(self, ctx: RunContext, model: str, config: str) -> dict[str, Any]:
        from graphflow.models.loading import load_vae

        return {"vae": replace(_load(ctx, model, config, load_vae), compile=compilation(ctx.options, "vae"))}


NODES = (CheckpointLoader, ControlNetLoader, VAELoader)
