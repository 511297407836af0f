"""Conversions between IMAGE/MASK tensors, numpy arrays and PIL images, and resizing.

IMAGE is a float32 tensor [B, H, W, 3] and MASK a float32 tensor [B, H, W], both in 0..1. The
per-item numpy views handed to OpenCV are float32 [H, W, 3] or [H, W].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from graphflow.errors import NodeInputError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

INTERPOLATIONS = ("lanczos", "bicubic", "bilinear", "nearest", "area")

# Names rather than cv2 constants so that importing this module does not import cv2.
_CV2_FLAGS = {
    "lanczos": "INTER_LANCZOS4",
    "bicubic": "INTER_CUBIC",
    "bilinear": "INTER_LINEAR",
    "nearest": "INTER_NEAREST",
    "area": "INTER_AREA",
}


# Modes Pillow's readers hand back whose convert("RGB") / convert("RGBA") is exact 8-bit colour.
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr"})
_SIXTEEN_BIT_GREY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_SIXTEEN_BIT = 65535


def picture_arrays(picture: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """A decoded picture's colour as float32 [H, W, 3] and its opacity as float32 [H, W] (None if opaque), in 0..1.

    16-bit grey is divided by 65535, 32-bit integers only when they fit in 16 bits, and floats are used as they
    are when finite and within 0..1; anything else raises NodeInputError naming the mode and the values found.
    """
    import numpy as np

    mode = picture.mode
    if mode in ("P", "PA") and picture.palette is None:
        raise NodeInputError("it is a palette image without a palette: its pixels have no colours")
    if mode in _EIGHT_BIT_MODES:
        target = "RGBA" if picture.has_transparency_data else "RGB"
        values = np.asarray(picture if mode == target else picture.convert(target), np.float32)
        values /= 255  # in place: a picture at the pixel limit is gigabytes as float32
        return (values, None) if target == "RGB" else (values[..., :3], values[..., 3])
    values = np.asarray(picture)
    if mode in _SIXTEEN_BIT_GREY_MODES or mode == "I":
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > _SIXTEEN_BIT:
            raise NodeInputError(f"its 32-bit integer pixels (mode I) range over {low}..{high}; only values in "
                                 f"0..{_SIXTEEN_BIT} (16 bits) map to 0..1 exactly. Save it as 16-bit or 8-bit")
        grey = values.astype(np.float32) / _SIXTEEN_BIT
        key = picture.info.get("transparency")  # a 16-bit grey PNG's tRNS: the one fully transparent value
        alpha = (values != key).astype(np.float32) if isinstance(key, int) else None
    elif mode == "F":
        _check_unit_range(values)
        grey, alpha = values.astype(np.float32), None
    else:
        raise NodeInputError(f"its pixel mode {mode} has no exact RGB conversion; save it as RGB, RGBA or grey")
    return np.repeat(grey[..., None], 3, axis=-1), alpha


def _check_unit_range(values: np.ndarray) -> None:
    """Refuse float pixels that are not finite values in 0..1: clipping them would change the picture unseen."""
    import numpy as np

    finite = np.isfinite(values)
    if finite.all() and values.min() >= 0 and values.max() <= 1:
        return
    found = f"values in {values[finite].min():g}..{values[finite].max():g}" if finite.any() else "no finite values"
    if not finite.all():
        found += f" and {int((~finite).sum())} NaN or infinite"
    raise NodeInputError(f"its 32-bit float pixels (mode F) must be finite and within 0..1; found {found}. "
                         "Scale it to 0..1 before loading it")


def deep_colour_scale(picture: Image.Image) -> int | None:
    """The full-scale value of a colour picture stored with more than 8 bits a channel (None for 8 bits or grey).

    Pillow has no mode for such pixels and silently keeps only their top 8 bits, so read this before `load()`.
    """
    if picture.mode not in ("RGB", "RGBA") or not picture.tile:
        return None
    codec, args = picture.tile[0].codec_name, picture.tile[0].args
    if codec in ("ppm", "ppm_plain"):  # args (rawmode, maxval): Pillow scales maxval to 255
        return args[1] if args[1] > 255 else None
    rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None
    return _SIXTEEN_BIT if isinstance(rawmode, str) and ";16" in rawmode else None


def deep_colour_arrays(data: bytes, full_scale: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """`picture_arrays` for the encoded colour image `data` of `deep_colour_scale`, decoded by OpenCV at full depth."""
    import cv2
    import numpy as np

    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # BGR(A), EXIF not applied
    if decoded is None or decoded.dtype != np.uint16 or decoded.ndim != 3 or decoded.shape[1::-1] != size:
        found = "nothing" if decoded is None else f"{decoded.dtype} {list(decoded.shape)}"
        raise NodeInputError(f"its 16-bit colour pixels did not decode (expected {size[0]} x {size[1]} 16-bit "
                             f"colour; OpenCV found {found})")
    if int(decoded.max()) > full_scale:
        raise NodeInputError(f"it holds pixel values above its own maximum {full_scale}")
    values = decoded.astype(np.float32) / full_scale
    return np.ascontiguousarray(values[..., 2::-1]), values[..., 3] if decoded.shape[2] == 4 else None


# EXIF orientation -> how an array [H, W, ...] stored that way is turned upright (as PIL's ImageOps.exif_transpose)
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: a.swapaxes(0, 1)[:, ::-1],
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: a.swapaxes(0, 1)[::-1],
}
EXIF_ORIENTATIONS = tuple(_UPRIGHT)


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """An array [H, W, ...] stored with EXIF orientation 1..8, turned to how it is meant to be seen."""
    return _UPRIGHT[orientation](array)


def to_uint8(batch: torch.Tensor) -> np.ndarray:
    """IMAGE or MASK values as a uint8 numpy array of the same shape: round(x * 255), clipped."""
    import torch

    return batch.detach().float().mul(255).round().clamp(0, 255).to("cpu", torch.uint8).numpy()


def from_uint8(array: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """A uint8 numpy array as a float32 tensor in 0..1 (x / 255) of the same shape."""
    import torch

    return torch.from_numpy(array).to(device, torch.float32).div(255)


def to_pictures(batch: torch.Tensor) -> list[Image.Image]:
    """An IMAGE or MASK batch as 8-bit Pillow pictures ("RGB" or "L"), rounded as `to_uint8`."""
    from PIL import Image

    return [Image.fromarray(item) for item in to_uint8(batch)]


def from_pictures(pictures: list[Image.Image]) -> torch.Tensor:
    """Pillow pictures of one size and mode as one IMAGE ("RGB") or MASK ("L") batch (x / 255)."""
    import numpy as np

    return from_uint8(np.stack([np.asarray(picture) for picture in pictures]))


def resize_like_pil(batch: torch.Tensor, width: int, height: int, *, grey: bool = False) -> torch.Tensor:
    """IMAGE [B, H, W, 3] resized as the diffusers pipelines resize PIL images: 8-bit, Lanczos, back to 0..1.
    `grey` converts to PIL's "L" first, giving [B, height, width, 1]."""
    from PIL import Image

    resized = from_pictures([(picture.convert("L") if grey else picture).resize((width, height),
                                                                                 Image.Resampling.LANCZOS)
                             for picture in to_pictures(batch)])
    return resized[..., None] if grey else resized


def grey_to_rgb(batch: torch.Tensor) -> torch.Tensor:
    """A one-channel batch [B, H, W] as IMAGE [B, H, W, 3] with the value in every channel."""
    return batch.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()


def map_items(batch: torch.Tensor, transform: Callable[[np.ndarray], np.ndarray]) -> torch.Tensor:
    """Apply `transform` to each item of a batch as a float32 numpy array; stack the results on the batch's device."""
    import numpy as np
    import torch

    items = batch.detach().to("cpu", torch.float32).numpy()
    results = [transform(np.ascontiguousarray(item)) for item in items]
    return torch.from_numpy(np.stack(results)).to(batch.device)


def resize(batch: torch.Tensor, width: int, height: int, interpolation: str) -> torch.Tensor:
    """An IMAGE or MASK batch resized to width x height with one of INTERPOLATIONS."""
    import cv2

    flag = getattr(cv2, _CV2_FLAGS[interpolation])
    resized = map_items(batch, lambda item: cv2.resize(item, (width, height), interpolation=flag))
    # Lanczos and bicubic overshoot at hard edges; IMAGE and MASK values must stay in 0..1.
    return resized.clamp_(0, 1)


def fit_box(columns: int, rows: int, width: int, height: int, *, truncate: bool = False) -> tuple[int, int, int, int]:
    """Where a columns x rows picture goes when fitted inside width x height keeping its aspect ratio, centred.

    The fitted sides are rounded, or truncated with `truncate` (as the ControlNet guide's preprocessors fit them).
    Returns (fit_width, fit_height, left, top).
    """
    scale = min(width / columns, height / rows)
    side = int if truncate else round
    fit_width, fit_height = max(1, side(columns * scale)), max(1, side(rows * scale))
    return fit_width, fit_height, (width - fit_width) // 2, (height - fit_height) // 2


def pad(
    batch: torch.Tensor, width: int, height: int, left: int, top: int, value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """An IMAGE or MASK batch placed at (left, top) on a width x height canvas of `value`.

    Returns the canvas and a MASK that is 1 on the border and 0 on the picture.
    """
    import torch

    size, rows, columns = batch.shape[:3]
    inside = (slice(None), slice(top, top + rows), slice(left, left + columns))
    canvas = torch.full((size, height, width, *batch.shape[3:]), value, dtype=torch.float32, device=batch.device)
    canvas[inside] = batch
    mask = torch.ones((size, height, width), dtype=torch.float32, device=batch.device)
    mask[inside] = 0
    return canvas, mask


def resize_pad(
    image: torch.Tensor, width: int, height: int, interpolation: str, pad_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit an IMAGE inside width x height keeping its aspect ratio, centred on a border of `pad_value`.

    Returns the padded IMAGE and a MASK that is 1 on the border and 0 on the picture.
    """
    fit_width, fit_height, left, top = fit_box(image.shape[2], image.shape[1], width, height)
    return pad(resize(image, fit_width, fit_height, interpolation), width, height, left, top, pad_value)
