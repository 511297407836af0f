"""Conversions between IMAGE/MASK tensors, numpy arrays and PIL images, and resizing.

IMAGE is a float32 tensor [B, H, W, 3] and MASK a float32 tensor [B, H, W], both in 0..1. The
per-item numpy views handed to OpenCV are float32 [H, W, 3] or [H, W].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

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


def pil_to_tensor(picture: Image.Image) -> torch.Tensor:
    """A PIL image as float32 in 0..1 with a batch of one: [1, H, W, C], or [1, H, W] for one band."""
    import numpy as np
    import torch

    array = np.asarray(picture)
    # Besides 8-bit modes, PIL only hands us its integer modes ("I;16", "I"), which hold 16-bit PNG data.
    full_scale = 255.0 if array.dtype == np.uint8 else 65535.0
    return torch.from_numpy(array.astype(np.float32) / full_scale).clamp_(0, 1).unsqueeze(0)


def to_uint8(batch: torch.Tensor) -> np.ndarray:
    """IMAGE or MASK values as a uint8 numpy array of the same shape: round(x * 255), clipped."""
    import torch

    return batch.detach().float().mul(255).round().clamp(0, 255).to("cpu", torch.uint8).numpy()


def from_uint8(array: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """A uint8 numpy array as a float32 tensor in 0..1 (x / 255) of the same shape."""
    import torch

    return torch.from_numpy(array).to(device, torch.float32).div(255)


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


def fit_box(columns: int, rows: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Where a columns x rows picture goes when fitted inside width x height keeping its aspect ratio, centred.

    Returns (fit_width, fit_height, left, top).
    """
    scale = min(width / columns, height / rows)
    fit_width, fit_height = max(1, round(columns * scale)), max(1, round(rows * scale))
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
