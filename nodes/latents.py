"""LATENT values, and the pixel <-> latent conversions VAEEncode and VAEDecode make.

LATENT is a plain dict of tensors and JSON scalars, so the on-disk cache can keep it:

    {"samples": tensor [B, 4, H/8, W/8],   # latents scaled by the VAE's scaling factor
     "family": "sd15" | "sdxl" | None,     # None: fits any model (EmptyLatent, a VAE of unknown family)
     "empty": True,                        # EmptyLatent only: a size to generate at, from pure noise
     # VAEEncode adds the encoder's distribution, which the Sampler samples with its own seeded generator
     # in the order the diffusers pipelines do (their VAE encode draws from the pipeline's generator):
     "moments": tensor [B, 8, H/8, W/8], "scaling_factor": float,
     # VAEEncode with a mask adds it, and the masked image's distribution (for 9-channel inpainting UNets):
     "mask": MASK [B, H, W], "masked_moments": tensor [B, 8, H/8, W/8]}

`samples` of an encoded image is the distribution's mean, scaled: what VAEDecode shows of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from graphflow.errors import NodeInputError
from graphflow.models.components import Autoencoder

if TYPE_CHECKING:
    import torch

LATENT_SCALE = 8  # pixels per latent along each side, for SD1.5 and SDXL


def check_size(width: int, height: int, what: str, fix: str = "") -> None:
    """Raise NodeInputError unless both sides are positive multiples of 8 (whole latents)."""
    if width % LATENT_SCALE or height % LATENT_SCALE or width <= 0 or height <= 0:
        raise NodeInputError(f"{what} is {width}x{height}; width and height must be multiples of {LATENT_SCALE}{fix}")


def binary_mask(mask: torch.Tensor) -> torch.Tensor:
    """MASK [B, H, W] as the pipelines' mask processor makes it: [B, 1, H, W] float32, 1 where >= 0.5, else 0."""
    import torch

    return (mask.to("cpu", torch.float32).unsqueeze(1) >= 0.5).to(torch.float32)


def image_to_pixels(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] in 0..1 as the VAE's input: float32 [B, 3, H, W] in -1..1 (on the CPU)."""
    import torch

    return 2.0 * image.to("cpu", torch.float32).permute(0, 3, 1, 2) - 1.0


def sample_encoded(latent: dict[str, Any], generator: torch.Generator, device: str,
                   dtype: torch.dtype) -> torch.Tensor:
    """An encoded image's latents as the pipelines' `retrieve_latents` draws them, scaled; other latents as they are."""
    moments = latent.get("moments")
    if moments is None:
        return latent["samples"].to(device, dtype)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    drawn = DiagonalGaussianDistribution(moments.to(device)).sample(generator)
    return latent["scaling_factor"] * drawn.to(dtype)


def needs_upcast(vae: Autoencoder, module: Any, family: str | None, *, encoding: bool = False) -> bool:
    """Whether to run the VAE in fp32, as the pipelines decide: a config asking for it, not SD1.5, and fp16
    weights, or when encoding, any half precision.

    SDXL pipelines honour `force_upcast`, decoding only from fp16 but encoding from bf16 too; SD1.5
    pipelines never upcast (their VAEs are fine in fp16).
    """
    import torch

    upcast_from = (torch.float16, torch.bfloat16) if encoding else (torch.float16,)
    return module.dtype in upcast_from and vae.force_upcast and family != "sd15"


@contextmanager
def precision(module: Any, upcast: bool) -> Iterator[Any]:
    """The module in fp32 inside the block when `upcast`, back in its own dtype afterwards."""
    import torch

    dtype = module.dtype
    if upcast:
        module.to(torch.float32)
    try:
        yield module
    finally:
        if upcast:
            module.to(dtype)


def encode(vae: Autoencoder, pixels: torch.Tensor) -> torch.Tensor:
    """The encoder's distribution parameters (mean and log-variance, [B, 8, h, w]) of pixels in -1..1.

    The pixels are rounded to the weights' dtype first, even when the VAE runs upcast: the pipelines
    move the image to the model dtype before their VAE upcast, and half-precision pixels change the result.
    """
    from graphflow.models import torch_dtype

    with vae.vae.use() as module, precision(module, needs_upcast(vae, module, vae.family, encoding=True)) as model:
        rounded = pixels.to(vae.vae.key.device, torch_dtype(vae.vae.key.dtype))
        return model.encode(rounded.to(model.dtype)).latent_dist.parameters


def decode(vae: Autoencoder, latent: dict[str, Any]) -> torch.Tensor:
    """IMAGE [B, H, W, 3] float32 on the CPU: `vae.decode(latents / scaling_factor)`, then (x / 2 + 0.5) in 0..1."""
    import torch

    family = latent.get("family") or vae.family  # EmptyLatent's latents belong to no family yet
    with vae.vae.use() as module, precision(module, needs_upcast(vae, module, family)) as model:
        latents = latent["samples"].to(vae.vae.key.device, model.dtype)
        pixels = model.decode(latents / vae.scaling_factor, return_dict=False)[0]
    return (pixels / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).to(torch.float32)
