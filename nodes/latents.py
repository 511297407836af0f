"""LATENT values, and the pixel <-> latent conversions VAEEncode and VAEDecode make.

A LATENT is a `Latent`, a frozen dataclass of tensors and scalars that the on-disk cache stores field
by field (no pickle). Its geometry comes from the VAE that made it (or, for EmptyLatent, is given):
`samples` is [B, C, H/scale, W/scale] with C the VAE's latent channels and scale its pixels per latent
(8 for SD1.5 and SDXL, 2 for diffusers' two-block test VAEs).

VAEEncode adds the encoder's distribution (`moments`), which the Sampler samples with its own seeded
generator in the order the diffusers pipelines do (their VAE encode draws from the pipeline's generator);
with a mask it adds the mask and the masked image's distribution (for 9-channel inpainting UNets).
`samples` of an encoded image is the distribution's mean, scaled: what VAEDecode shows of it.

Both hold the VAE alone while they run (`held_vae`): the run's VAE tiling / slicing and an fp32 upcast change the
module every graph shares, only inside that block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graphflow.disk_format import payload
from graphflow.errors import NodeInputError
from graphflow.models.components import Autoencoder
from graphflow.models.memory import MemoryOptions

if TYPE_CHECKING:
    import torch

LATENT_SCALE = 8  # pixels per latent along each side of SD1.5 and SDXL VAEs: EmptyLatent's default
NO_MEMORY_OPTIONS = MemoryOptions()  # no VAE tiling or slicing: the pipelines' default


@payload
@dataclass(frozen=True, eq=False)
class Latent:
    """LATENT: latents with the geometry and provenance the Sampler and VAEDecode need."""

    samples: torch.Tensor  # [B, C, h, w], scaled by the VAE's scaling factor
    family: str | None = None  # None: fits any model (EmptyLatent, a VAE of unknown family)
    scale: int = LATENT_SCALE  # pixels per latent along each side
    empty: bool = False  # EmptyLatent: only a size to generate at, from pure noise
    moments: torch.Tensor | None = None  # VAEEncode: the distribution [B, 2C, h, w]
    scaling_factor: float | None = None
    mask: torch.Tensor | None = None  # VAEEncode with a mask: MASK [B, H, W]
    masked_moments: torch.Tensor | None = None
    # the Sampler with a list of seeds: the batch is this many equal groups, each sampled on its own (one seed)
    groups: int = 1

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.samples.shape[3] * self.scale, self.samples.shape[2] * self.scale

    def replace(self, **changes: Any) -> Latent:
        return dataclasses.replace(self, **changes)

    def group(self, index: int) -> Latent:
        """The images of the `index`-th of `groups` (one seed's, from a Sampler given a list of seeds)."""
        groups = self.groups
        return self.replace(samples=group_rows(self.samples, index, groups),
                            moments=group_rows(self.moments, index, groups), mask=group_rows(self.mask, index, groups),
                            masked_moments=group_rows(self.masked_moments, index, groups), groups=1)


def group_rows(tensor: torch.Tensor | None, index: int, groups: int) -> torch.Tensor | None:
    """The rows of the `index`-th of `groups` equal parts of a batch; a batch of one (a mask for all) is every
    part's."""
    if tensor is None or tensor.shape[0] == 1:
        return tensor
    rows = tensor.shape[0] // groups
    return tensor[index * rows:(index + 1) * rows]


def check_size(width: int, height: int, what: str, fix: str = "", scale: int = LATENT_SCALE) -> None:
    """Raise NodeInputError unless both sides are positive multiples of `scale` (whole latents)."""
    if width % scale or height % scale or width <= 0 or height <= 0:
        raise NodeInputError(f"{what} is {width}x{height}; width and height must be multiples of {scale}{fix}")


def binary_mask(mask: torch.Tensor) -> torch.Tensor:
    """MASK [B, H, W] as the pipelines' mask processor makes it: [B, 1, H, W] float32, 1 where >= 0.5, else 0."""
    import torch

    return (mask.to("cpu", torch.float32).unsqueeze(1) >= 0.5).to(torch.float32)


def image_to_pixels(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] in 0..1 as the VAE's input: float32 [B, 3, H, W] in -1..1 (on the CPU)."""
    import torch

    return 2.0 * image.to("cpu", torch.float32).permute(0, 3, 1, 2) - 1.0


def sample_encoded(latent: Latent, generator: torch.Generator, device: str, dtype: torch.dtype,
                   moments: torch.Tensor | None = None) -> torch.Tensor:
    """An encoded image's latents as the pipelines' `retrieve_latents` draws them (from `moments`, by default the
    latent's own), scaled; other latents as they are."""
    moments = latent.moments if moments is None else moments
    if moments is None:
        return latent.samples.to(device, dtype)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    drawn = DiagonalGaussianDistribution(moments.to(device)).sample(generator)
    return latent.scaling_factor * drawn.to(dtype)


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


@contextmanager
def held_vae(vae: Autoencoder, memory: MemoryOptions, upcast: Callable[[Any], bool]) -> Iterator[Any]:
    """The VAE module held by this block alone, tiled / sliced as `memory` asks, in fp32 when `upcast(module)`,
    compiled when `vae` says so; exactly as it was again after the block (other graphs share it)."""
    from graphflow.models.memory import configured_vae, exclusive

    with exclusive(vae.vae) as module, configured_vae(module, memory, vae.scale), \
            precision(module, upcast(module)) as model:
        yield vae.compiled(model)


def encode(vae: Autoencoder, pixels: torch.Tensor, memory: MemoryOptions = NO_MEMORY_OPTIONS) -> torch.Tensor:
    """The encoder's distribution parameters (mean and log-variance, [B, 8, h, w]) of pixels in -1..1.

    The pixels are rounded to the weights' dtype first, even when the VAE runs upcast: the pipelines
    move the image to the model dtype before their VAE upcast, and half-precision pixels change the result.
    """
    from graphflow.models import torch_dtype

    with held_vae(vae, memory, lambda module: needs_upcast(vae, module, vae.precision_family, encoding=True)) as model:
        rounded = pixels.to(vae.vae.key.device, torch_dtype(vae.vae.key.dtype))
        return model.encode(rounded.to(model.dtype)).latent_dist.parameters


def decode(vae: Autoencoder, latent: Latent, memory: MemoryOptions = NO_MEMORY_OPTIONS) -> torch.Tensor:
    """IMAGE [B, H, W, 3] float32 on the CPU: `vae.decode(latents / scaling_factor)`, then (x / 2 + 0.5) in 0..1."""
    import torch

    family = latent.family or vae.precision_family  # EmptyLatent's latents belong to no family yet
    with held_vae(vae, memory, lambda module: needs_upcast(vae, module, family)) as model:
        latents = latent.samples.to(vae.vae.key.device, model.dtype)
        pixels = model.decode(latents / vae.scaling_factor, return_dict=False)[0]
    return (pixels / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).to(torch.float32)
