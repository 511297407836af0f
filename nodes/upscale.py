"""Resizing images and latents: ImageScale, and LatentUpscale (the first half of a hires fix).

One definition of each method serves images and latents; both are resampled as float32 [B, C, H, W]:

- nearest-exact: each output pixel copies the input pixel under its centre (torch's "nearest-exact"); no new
  values appear, so edge maps and masks stay crisp.
- bilinear, bicubic: Pillow's BILINEAR and BICUBIC filters (the triangle; Keys' cubic with a = -0.5), widened by
  the factor when shrinking so that every input pixel counts: torch's interpolate with antialias=True, which equals
  Pillow's float resize to float32 rounding. Enlarging, bilinear is plain bilinear interpolation (pixel centres,
  align_corners=False). ComfyUI's differ when shrinking (it does not antialias) and in bicubic (a = -0.75).
- area: each output pixel is the mean of the input pixels its area touches (torch's "area", adaptive average
  pooling); enlarging, it repeats pixels as nearest does.
- lanczos (images only): Pillow's LANCZOS, a 3-lobed windowed sinc widened when shrinking, computed here in float
  from Pillow's own coefficients (ComfyUI and the pipelines go through 8-bit PIL images, which rounds to 1/255).
- bislerp (latents only): bilinear interpolation between the two nearest pixel centres along each axis (across,
  then down), where each blend of two latent vectors (over the channels) turns the direction spherically and blends
  the length linearly, as ComfyUI's bislerp does; between unlike neighbours the latents keep their magnitude
  instead of shrinking towards zero. Vectors that point the same way, or opposite ways, or are zero, blend linearly.

Images are clamped to 0..1 afterwards (bicubic and lanczos overshoot at hard edges); latents are not.

Target size: width x height; a side given as 0 keeps the aspect ratio from the other side; both 0 multiplies
each side by scale_by (rounded). crop "center" first cuts the input to the target's aspect ratio, centred, as
ComfyUI's ImageScale does, so nothing is stretched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from graphflow.node import Input, Node, Output
from graphflow.types import FLOAT, IMAGE, INT, LATENT, STRING
from nodes.latents import Latent

if TYPE_CHECKING:
    import torch

IMAGE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")  # ComfyUI's names
LATENT_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
CROPS = ("disabled", "center")
MAX_SIDE = 16384
_LANCZOS_LOBES = 3.0
_PARALLEL = 1 - 1e-5  # |cos| of the angle between two latent vectors beyond which bislerp blends them linearly


def target_size(columns: int, rows: int, width: int, height: int, scale_by: float, unit: int = 1) -> tuple[int, int]:
    """(width, height) to resize a columns x rows picture to, in whole `unit`s (pixels per latent for latents).

    A side of 0 keeps the aspect ratio from the other; both 0 scales each side by `scale_by`.
    """
    if width == 0 and height == 0:
        size = (max(1, round(columns / unit * scale_by)) * unit, max(1, round(rows / unit * scale_by)) * unit)
    elif scale_by != 1.0:
        raise NodeInputError(f"both a size ({width}x{height}) and scale_by {scale_by} are given; set width and height "
                             "to 0 to scale by the factor, or scale_by to 1 to resize to the size")
    else:
        size = (width or max(1, round(columns * height / rows / unit)) * unit,
                height or max(1, round(rows * width / columns / unit)) * unit)
    if max(size) > MAX_SIDE:
        raise NodeInputError(f"the result would be {size[0]}x{size[1]} pixels; each side may be at most {MAX_SIDE}")
    return size


def center_crop(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B, C, H, W] cut to the aspect ratio of width x height around the centre (ComfyUI's crop="center")."""
    rows, columns = samples.shape[2:]
    aspect, target = columns / rows, width / height
    left = min(round((columns - columns * target / aspect) / 2), (columns - 1) // 2) if aspect > target else 0
    top = min(round((rows - rows * aspect / target) / 2), (rows - 1) // 2) if aspect < target else 0
    return samples[:, :, top:rows - top, left:columns - left]


def resample(samples: torch.Tensor, width: int, height: int, method: str) -> torch.Tensor:
    """float [B, C, H, W] resized to [B, C, height, width] with one of IMAGE_METHODS or LATENT_METHODS (see the
    module docstring)."""
    import torch

    samples = samples.to(torch.float32)
    if method in _SEPARABLE:  # across first, then down, as Pillow does; rows are gathered whole (contiguous)
        down = _SEPARABLE[method]
        return down(down(samples.transpose(2, 3).contiguous(), width).transpose(2, 3).contiguous(), height)
    antialias = {"antialias": True} if method in ("bilinear", "bicubic") else {}
    return torch.nn.functional.interpolate(samples, size=(height, width), mode=method, **antialias)


def _lanczos_down(samples: torch.Tensor, height: int) -> torch.Tensor:
    """float [B, C, H, W] resized to height rows by Pillow's LANCZOS filter: each output row is a weighted sum of
    a few input rows, weights and window as Pillow's Resample.c `precompute_coeffs` computes them."""
    import math

    import torch

    rows = samples.shape[2]
    scale = rows / height
    stretch = max(scale, 1.0)  # shrinking widens the filter over every input pixel an output pixel covers
    support = _LANCZOS_LOBES * stretch
    centres = ((torch.arange(height, dtype=torch.float64) + 0.5) * scale)[:, None]
    first = torch.trunc(centres - support + 0.5).clamp(min=0)
    positions = first + torch.arange(2 * math.ceil(support) + 1, dtype=torch.float64)  # [height, taps]
    x = (positions - centres + 0.5) / stretch
    window = (positions < torch.trunc(centres + support + 0.5).clamp(max=rows)) & (x >= -_LANCZOS_LOBES) & \
        (x < _LANCZOS_LOBES)
    weights = torch.where(window, torch.sinc(x) * torch.sinc(x / _LANCZOS_LOBES), 0.0)
    totals = weights.sum(dim=1, keepdim=True)
    # [taps, height] (and a column axis for the weights), each tap's row contiguous: gathering is the costly part
    weights = (weights / torch.where(totals == 0, 1.0, totals)).T.contiguous().to(samples.device, samples.dtype)
    indices = positions.clamp(max=rows - 1).long().T.contiguous().to(samples.device)
    resized = samples[:, :, indices[0]] * weights[0, :, None]
    for tap in range(1, len(indices)):  # a few whole rows per tap, not a dense [height, rows] product
        resized += samples[:, :, indices[tap]] * weights[tap, :, None]
    return resized


def _slerp_down(samples: torch.Tensor, height: int) -> torch.Tensor:
    """float [B, C, H, W] resized to height rows by bislerp: each output row blends the two input rows around its
    centre (as bilinear, align_corners=False), each pixel's C-vector turned spherically."""
    import torch

    rows = samples.shape[2]
    positions = ((torch.arange(height, dtype=torch.float64) + 0.5) * rows / height - 0.5).clamp(0, rows - 1)
    above = positions.floor().long()
    below = (above + 1).clamp(max=rows - 1)
    ratio = (positions - above).to(samples.device, samples.dtype)[:, None]
    a, b = samples[:, :, above.to(samples.device)], samples[:, :, below.to(samples.device)]
    a_length, b_length = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    a_unit = a / torch.where(a_length == 0, 1.0, a_length)
    b_unit = b / torch.where(b_length == 0, 1.0, b_length)
    cosine = (a_unit * b_unit).sum(dim=1, keepdim=True).clamp(-1, 1)
    angle = torch.acos(cosine)
    sine = torch.where(cosine.abs() > _PARALLEL, 1.0, torch.sin(angle))
    direction = (torch.sin((1 - ratio) * angle) * a_unit + torch.sin(ratio * angle) * b_unit) / sine
    turned = direction * ((1 - ratio) * a_length + ratio * b_length)
    linear = (cosine.abs() > _PARALLEL) | (a_length == 0) | (b_length == 0) | (ratio == 0)
    return torch.where(linear, (1 - ratio) * a + ratio * b, turned)


_SEPARABLE = {"lanczos": _lanczos_down, "bislerp": _slerp_down}


def _method_input(methods: tuple[str, ...], default: str) -> Input:
    described = {
        "nearest-exact": "nearest-exact copies the nearest pixel (no new values)",
        "bilinear": "bilinear and bicubic are Pillow's filters, antialiased when shrinking",
        "area": "area averages the pixels each output pixel covers (best for shrinking)",
        "lanczos": "lanczos is Pillow's, in float (sharpest)",
        "bislerp": "bislerp is bilinear that blends latent vectors spherically, keeping their magnitude",
    }
    return Input("method", STRING, "Resampling: " + "; ".join(text for name, text in described.items()
                                                             if name in methods) + ".",
                 default=default, choices=methods)


def _crop_input() -> Input:
    return Input("crop", STRING, "center first cuts the input to the target's aspect ratio around its centre, so "
                 "nothing is stretched; disabled stretches it to the target.", default="disabled", choices=CROPS)


def _scale_by_input(what: str) -> Input:
    return Input("scale_by", FLOAT, f"With width and height 0: multiply each side by this (the result rounded to "
                 f"whole {what}). Leave it at 1 when giving a size.", default=1.0, min=0.01, max=8.0)


class ImageScale(Node):
    """Resize images to a size or by a factor, optionally centre-cropped to the new aspect ratio first."""

    category = "resize"
    inputs = (
        Input("image", IMAGE, "The images to resize."),
        _method_input(IMAGE_METHODS, "lanczos"),
        Input("width", INT, "Output width in pixels; 0 keeps the aspect ratio from height (both 0: use scale_by).",
              default=0, min=0, max=MAX_SIDE),
        Input("height", INT, "Output height in pixels; 0 keeps the aspect ratio from width.",
              default=0, min=0, max=MAX_SIDE),
        _scale_by_input("pixels"),
        _crop_input(),
    )
    outputs = (Output("image", IMAGE, "The resized images, in 0..1."),)

    def run(self, ctx: RunContext, image: torch.Tensor, method: str, width: int, height: int, scale_by: float,
            crop: str) -> dict[str, Any]:
        width, height = target_size(image.shape[2], image.shape[1], width, height, scale_by)
        samples = image.permute(0, 3, 1, 2)
        if crop == "center":
            samples = center_crop(samples, width, height)
        resized = resample(samples, width, height, method).clamp_(0, 1)
        return {"image": resized.permute(0, 2, 3, 1).contiguous()}


class LatentUpscale(Node):
    """Resize latents (of an image) to a size or by a factor: with a second, img2img Sampler, a hires fix."""

    category = "resize"
    inputs = (
        Input("latent", LATENT, "The latents to resize, e.g. from a Sampler or VAEEncode (not an EmptyLatent)."),
        _method_input(LATENT_METHODS, "bilinear"),
        Input("width", INT, "Output width in pixels, a multiple of the latent's pixels per latent (8 for SD1.5 and "
              "SDXL); 0 keeps the aspect ratio from height (both 0: use scale_by).", default=0, min=0, max=MAX_SIDE),
        Input("height", INT, "Output height in pixels, as for width; 0 keeps the aspect ratio from width.",
              default=0, min=0, max=MAX_SIDE),
        _scale_by_input("latents"),
        _crop_input(),
    )
    outputs = (Output("latent", LATENT, "The resized latents, of the same model family: the start point of an "
                      "img2img Sampler, which noises them to its strength (they no longer encode an image, so the "
                      "encoder's distribution and any mask are dropped)."),)

    def run(self, ctx: RunContext, latent: Latent, method: str, width: int, height: int, scale_by: float,
            crop: str) -> dict[str, Any]:
        if latent.empty:
            raise NodeInputError("the latent is an EmptyLatent: only a size to generate at, no image yet; give "
                                 "EmptyLatent the upscaled size instead, or upscale a Sampler's latent (hires fix)")
        scale = latent.scale
        if width % scale or height % scale:
            raise NodeInputError(f"width x height is {width}x{height}; each must be a multiple of {scale}, the "
                                 "latent's pixels per latent (or 0, to keep the aspect ratio from the other)")
        columns, rows = latent.size
        width, height = target_size(columns, rows, width, height, scale_by, scale)
        samples = latent.samples
        if crop == "center":
            samples = center_crop(samples, width, height)
        resized = resample(samples, width // scale, height // scale, method).to(latent.samples.dtype)
        # a batch of seeds sampled one by one stays one (VAEDecode and a next Sampler take its groups apart)
        return {"latent": Latent(resized, latent.family, scale, groups=latent.groups)}


NODES = (ImageScale, LatentUpscale)
