"""Pictures a sweep writes itself: IMAGE outputs of graphs without an output node, and the contact sheet.

The contact sheet is a grid of thumbnails, one per image file of each job, each labelled under it with the job's
varied params, so a sweep's results can be compared at a glance (A1111's X/Y plot, without the axes).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

THUMBNAIL = 256  # the longest side of a thumbnail, in pixels; smaller pictures are not enlarged
MIN_CELL_WIDTH = 128  # room for a label under a tiny picture
LINE_HEIGHT = 14  # per label line (Pillow's default font is 10-11 px high)
PADDING = 4


def image_pngs(value: Any, params: Mapping[str, Any]) -> list[bytes]:
    """PNG bytes of each picture of an IMAGE value (float [B, H, W, 3] in 0..1, rounded as SaveImage rounds), with
    the job's params embedded as SaveImage embeds them."""
    from PIL import Image, PngImagePlugin

    pixels = value.detach().float().mul(255).round().clamp(0, 255).to("cpu").byte().numpy()
    info = PngImagePlugin.PngInfo()
    info.add_text("params", json.dumps(dict(params), ensure_ascii=False))
    encoded = []
    for picture in pixels:
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG", pnginfo=info)
        encoded.append(buffer.getvalue())
    return encoded


def is_image(value: Any) -> bool:
    """Whether a run's output value is an IMAGE batch."""
    shape = getattr(value, "shape", None)
    return shape is not None and len(shape) == 4 and shape[-1] == 3


@dataclass(frozen=True)
class Cell:
    """One picture of the sheet and the lines of its label."""

    path: Path
    label: tuple[str, ...]


def sheet_layout(cells: Sequence[Cell], sizes: Sequence[tuple[int, int]], columns: int) -> tuple[int, int, int, int]:
    """(columns, rows, cell width, cell height) of a sheet of `cells` whose thumbnails have `sizes`."""
    columns = max(1, min(columns, len(cells)))
    rows = math.ceil(len(cells) / columns)
    lines = max((len(cell.label) for cell in cells), default=0)
    width = max(MIN_CELL_WIDTH, *(size[0] for size in sizes)) + 2 * PADDING
    height = max(size[1] for size in sizes) + lines * LINE_HEIGHT + 3 * PADDING
    return columns, rows, width, height


def write_contact_sheet(cells: Sequence[Cell], path: Path, columns: int | None = None) -> Path | None:
    """Write the sheet of `cells` to `path` (atomically); None, writing nothing, when there are no cells.
    `columns` defaults to the square root of the count, rounded up."""
    from PIL import Image, ImageDraw, ImageFont

    from graphflow.atomic import atomic_write

    if not cells:
        return None
    thumbnails = []
    for cell in cells:
        with Image.open(cell.path) as picture:
            thumbnail = picture.convert("RGB")
        thumbnail.thumbnail((THUMBNAIL, THUMBNAIL))
        thumbnails.append(thumbnail)
    columns, rows, width, height = sheet_layout(cells, [t.size for t in thumbnails],
                                                columns or math.ceil(math.sqrt(len(cells))))
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    top = max(t.size[1] for t in thumbnails)
    for position, (cell, thumbnail) in enumerate(zip(cells, thumbnails, strict=True)):
        left, upper = (position % columns) * width, (position // columns) * height
        sheet.paste(thumbnail, (left + (width - thumbnail.size[0]) // 2, upper + PADDING))
        for line, text in enumerate(cell.label):
            draw.text((left + PADDING, upper + top + 2 * PADDING + line * LINE_HEIGHT),
                      _fitted(draw, font, text, width - 2 * PADDING), fill="black", font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())
    return path


def _fitted(draw: Any, font: Any, text: str, width: int) -> str:
    """`text`, cut and ended with "..." when it is wider than `width` pixels in `font`."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
