"""Image files in and out, and fitting images to a size: LoadImage, LoadMask, SaveImage, ResizePad."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphflow.atomic import Staged, remove_stale_temp_files
from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from graphflow.node import Input, Node, Output
from graphflow.types import FLOAT, IMAGE, INT, MASK, PATHS, STRING
from nodes.imaging import (
    EXIF_ORIENTATIONS,
    INTERPOLATIONS,
    deep_colour_arrays,
    deep_colour_scale,
    orient,
    picture_arrays,
    resize_pad,
    to_uint8,
)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF", "PPM")  # Pillow's names; others are refused
MAX_IMAGE_PIXELS = 2**26  # 8192 x 8192; the engine option max_image_pixels (`--max-image-pixels`) replaces it
_EXIF_ORIENTATION = 0x0112
_BYTES_PER_PIXEL = 40  # peak memory of LoadImage on an RGBA PNG, measured
_PATH_DESCRIPTION = ("Image file (PNG, JPEG, WebP, TIFF, BMP, GIF, PPM), relative to the input directory; of an "
                     "animation or a multi-page TIFF, the first frame. 16-bit and float images keep their range.")

# Weights that turn RGB into each LoadMask channel; BT.601 luma is what PIL's convert("L") uses.
CHANNEL_WEIGHTS = {
    "luminance": (0.299, 0.587, 0.114),
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
}


def _load(ctx: RunContext, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An image file, upright per its EXIF orientation, as IMAGE and its transparency as MASK (transparent = 1)."""
    import numpy as np
    import torch

    # the bytes the engine hashed into the cache key, never the path reopened: the file may have changed since
    colour, opacity = _decode(ctx.read_file(path), path, _max_pixels(ctx))
    image = torch.from_numpy(np.ascontiguousarray(colour)).unsqueeze(0)
    if opacity is None:
        return image, torch.zeros(image.shape[:3], dtype=torch.float32)  # explicit: loads elsewhere switch the default
    return image, 1 - torch.from_numpy(np.ascontiguousarray(opacity)).unsqueeze(0)


def _max_pixels(ctx: RunContext) -> int:
    value = ctx.options.get("max_image_pixels")
    if value is None:
        return MAX_IMAGE_PIXELS
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise NodeInputError(f"the engine option max_image_pixels must be a positive whole number; found {value!r}")
    return value


def _decode(data: bytes, path: str, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Colour and opacity arrays of encoded image `data` (`picture_arrays`), refused before decoding when its
    header declares more than `max_pixels` pixels; every problem is a NodeInputError that names `path`."""
    from PIL import Image

    part = "header"  # the part of the file being read, for the message when it is broken
    try:
        picture = _open_lazily(data)
        _check_pixels(picture.size, max_pixels)
        deep = deep_colour_scale(picture)  # read before load(), which drops the raw-mode description
        part = "pixel data"
        picture.load()
        if picture.format == "PNG":
            _check_png_rows(data)
        part = "EXIF data"
        orientation = _orientation(picture)
        part = "pixel data"
        colour, opacity = picture_arrays(picture) if deep is None else deep_colour_arrays(data, deep, picture.size)
    except NodeInputError as error:
        raise NodeInputError(f"{path}: {error}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:  # Pillow's own, process-wide
        raise NodeInputError(f"{path}: {error} That is Pillow's own limit, PIL.Image.MAX_IMAGE_PIXELS, shared by "
                             "the whole process; graphflow does not change it") from None
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ... on malformed data
        raise NodeInputError(f"{path}: not a readable image, its {part} is broken "
                             f"({type(error).__name__}: {error})") from error
    return orient(colour, orientation), None if opacity is None else orient(opacity, orientation)


def _open_lazily(data: bytes) -> Image.Image:
    """`data` identified as one of IMAGE_FORMATS with its header read and no pixel decoded.

    This is what `PIL.Image.open` does, minus its check against the process-wide `Image.MAX_IMAGE_PIXELS`: that
    check warns (or raises) before the caller sees the size, and the caller applies its own limit instead.
    """
    import io

    from PIL import Image

    Image.init()
    for name in IMAGE_FORMATS:
        factory, accept = Image.OPEN[name]
        accepted = accept is None or accept(data[:16])
        if isinstance(accepted, str):  # the format is known but this Pillow cannot read it (a codec is missing)
            raise NodeInputError(accepted)
        if accepted:
            return factory(io.BytesIO(data), "")
    raise NodeInputError(f"not an image in a supported format (expected {', '.join(IMAGE_FORMATS)}; the file "
                         f"starts with {data[:12]!r})")


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise NodeInputError(f"its header declares {width} x {height} pixels; an image needs at least 1 x 1")
    if width * height > max_pixels:
        raise NodeInputError(
            f"it is {width} x {height} = {width * height:,} pixels, more than the limit of {max_pixels:,} pixels; "
            f"decoding it would take about {width * height * _BYTES_PER_PIXEL >> 20:,} MiB of memory. If you trust "
            f"the file, raise the limit: `graphflow run --max-image-pixels {width * height}`, or the engine option "
            "max_image_pixels")


# Adam7 interlacing: each pass's first column and row, and its column and row steps
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type


def _check_png_rows(data: bytes) -> None:
    """Refuse a PNG whose image data ends before its last row: Pillow fills the missing rows with black unseen.

    Counts the inflated IDAT bytes (in bounded steps, keeping none) against what the header's rows need.
    """
    import struct
    import zlib

    if data[12:16] != b"IHDR":
        raise NodeInputError("its first chunk is not the IHDR header that PNG requires")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    sizes = [(-(-(width - x) // dx), -(-(height - y) // dy)) for x, y, dx, dy in passes]
    needed = sum(rows * (1 + (columns * _PNG_CHANNELS[colour] * depth + 7) // 8)
                 for columns, rows in sizes if columns > 0 and rows > 0)
    inflater, produced, offset, view = zlib.decompressobj(), 0, 8, memoryview(data)
    while produced < needed and offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        # in small pieces, each inflated at most 1 MiB at a time: bounded memory, and short unconsumed tails to copy
        for start in range(offset + 8, offset + 8 + length, 1 << 16) if kind == b"IDAT" else ():
            pending = view[start:min(start + (1 << 16), offset + 8 + length)]
            while pending and produced < needed:
                produced += len(inflater.decompress(pending, 1 << 20))
                pending = inflater.unconsumed_tail
        offset += 12 + length
    if produced < needed:
        raise NodeInputError(f"its image data ends after {produced:,} of the {needed:,} bytes its "
                             f"{width} x {height} pixels need")


def _orientation(picture: Image.Image) -> int:
    """The picture's EXIF orientation (1 = upright when it has none, or 0, which cameras write for "unknown")."""
    orientation = picture.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation == 0:
        return 1
    if isinstance(orientation, bool) or orientation not in EXIF_ORIENTATIONS:
        raise NodeInputError(f"its EXIF orientation is {orientation!r}; expected one of 1..8 (or none)")
    return orientation


class LoadImage(Node):
    """Read an image file as IMAGE, with a MASK that marks its transparent pixels for repainting."""

    category = "image"
    version = "1.1.0"  # 1.1: 16-bit colour keeps 16 bits; integer, float and orientation values are checked
    inputs = (Input("path", STRING, _PATH_DESCRIPTION, file=True),)
    outputs = (
        Output("image", IMAGE, "The RGB pixels; palette and grey images are converted to RGB."),
        Output("mask", MASK, "1 where the image is transparent, 0 where opaque; all 0 without an alpha channel."),
    )

    def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        image, mask = _load(ctx, path)
        return {"image": image, "mask": mask}


class LoadMask(Node):
    """Read one channel of an image file as a MASK."""

    category = "image"
    version = "1.1.0"  # as LoadImage
    inputs = (
        Input("path", STRING, _PATH_DESCRIPTION, file=True),
        Input("channel", STRING, "Channel that becomes the mask: white (or full red, green, blue) = 1; "
              "for alpha, transparent = 1 as in LoadImage's mask, and an image without alpha gives all 0.",
              default="luminance", choices=(*CHANNEL_WEIGHTS, "alpha")),
    )
    outputs = (Output("mask", MASK, "1 = repaint / selected, 0 = keep."),)

    def run(self, ctx: RunContext, path: str, channel: str) -> dict[str, Any]:
        import torch

        image, transparency = _load(ctx, path)
        if channel == "alpha":
            return {"mask": transparency}
        return {"mask": image @ torch.tensor(CHANNEL_WEIGHTS[channel], dtype=torch.float32)}


class SaveImage(Node):
    """Write each image of a batch to a PNG under the output directory, with the graph and params embedded."""

    category = "image"
    is_output = True
    uses_options = ("document",)  # the files embed the document and params: a new one writes new files
    inputs = (
        Input("image", IMAGE, "The images to save, one file each."),
        Input("prefix", STRING, "File name start, relative to the output directory; may name folders "
              "(\"renders/room\"). Files are PREFIX_00000.png, PREFIX_00001.png, ...: the number after the "
              "highest one already there, so existing files are never overwritten.",
              default="graphflow", output_path=True),
    )
    outputs = (Output("paths", PATHS, "Absolute paths of the written files."),)

    def run(self, ctx: RunContext, image: torch.Tensor, prefix: str) -> dict[str, Any]:
        text = _png_text(ctx)
        encoded = [_encode_png(pixels, text) for pixels in to_uint8(image)]  # all of them before any file exists
        remove_stale_temp_files(ctx.output_path(f"{prefix}_00000.png").parent, ".png")  # left by killed runs
        paths = _write_all(ctx, prefix, encoded)
        for path in paths:
            ctx.wrote(path)
        # besides the declared output, what each file was when written: a file changed since is not this output
        return {"paths": [str(path) for path in paths], "stamps": [_stamp(path) for path in paths]}

    def outputs_still_valid(self, outputs: dict[str, Any]) -> bool:
        return [_stamp(Path(path)) for path in outputs["paths"]] == outputs.get("stamps")


def _stamp(path: Path) -> tuple[int, ...] | None:
    """What changes whenever a file is replaced or written to (its inode, size and times); None when it is gone."""
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def _png_text(ctx: RunContext) -> dict[str, str]:
    """The PNG text chunks that let `graphflow run image.png` run the workflow again (graphflow.rerun)."""
    from graphflow.rerun import png_text

    return {key: _utf8_json(value) for key, value in png_text(ctx).items()}


def _utf8_json(text: str) -> str:
    """JSON text as PNG text chunks can hold it (UTF-8): text with lone surrogates (JSON allows "\\ud800", UTF-8 has
    no such character) is written with escapes instead, which read back to the same value."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(json.loads(text), ensure_ascii=True, indent=2)
    return text


def _encode_png(pixels: np.ndarray, text: dict[str, str]) -> bytes:
    """PNG bytes of one uint8 [H, W, 3] image; text that Latin-1 cannot hold goes into iTXt (UTF-8) chunks."""
    import io

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _first_unused_counter(ctx: RunContext, prefix: str) -> int:
    """One more than the highest PREFIX_NNNNN.png counter already in the output directory (0 if none)."""
    probe = ctx.output_path(f"{prefix}_00000.png")
    if not probe.parent.is_dir():
        return 0
    pattern = re.compile(re.escape(probe.name.removesuffix("_00000.png")) + r"_(\d{5,})\.png")
    counters = [int(match[1]) for entry in probe.parent.iterdir() if (match := pattern.fullmatch(entry.name))]
    return max(counters, default=-1) + 1


def _write_all(ctx: RunContext, prefix: str, encoded: list[bytes]) -> list[Path]:
    """Write each PNG to the next PREFIX_NNNNN.png that does not exist, all or none. Every file is written whole to a
    temporary file first, then they are put in place one after the other: a process killed before that leaves
    only temporary files (which the next run removes), and anything that stops the placing (an error,
    KeyboardInterrupt) removes the files already placed before the error goes on.

    Scanning gave free counters, but another process may take one first: placing never replaces a file.
    """
    folder = ctx.output_path(f"{prefix}_00000.png").parent
    name = ctx.output_path(f"{prefix}_00000.png").name
    staged: list[Staged] = []
    placed: list[tuple[Staged, Path]] = []  # each attempt, kept until it is known to have failed
    try:
        staged.extend(Staged(folder, name, data) for data in encoded)
        counter = _first_unused_counter(ctx, prefix)
        for file in staged:
            while True:
                path = ctx.output_path(f"{prefix}_{counter:05d}.png")
                counter += 1
                placed.append((file, path))
                if not os.path.lexists(path) and file.place(path, exclusive=True):
                    break
                placed.pop()
    except BaseException:
        for file, path in placed:
            if file.is_at(path):  # ours for sure, even if the interrupt came between placing it and knowing so
                with contextlib.suppress(OSError):  # best effort: the error that stopped the batch is reported
                    path.unlink()
        raise
    finally:
        for file in staged:
            file.discard()
    return [path for _, path in placed]


class ResizePad(Node):
    """Fit an image inside width x height keeping its aspect ratio, centred, and pad the rest."""

    category = "image"
    inputs = (
        Input("image", IMAGE, "The image to fit."),
        Input("width", INT, "Output width in pixels.", default=512, min=1, max=16384),
        Input("height", INT, "Output height in pixels.", default=512, min=1, max=16384),
        Input("interpolation", STRING, "Resampling filter: lanczos (sharpest), bicubic, bilinear, nearest "
              "(adds no new values; for edge maps and masks), area (best for shrinking).",
              default="lanczos", choices=INTERPOLATIONS),
        Input("pad_value", FLOAT, "Grey level of the padding, 0 = black to 1 = white.", default=0.0, min=0.0, max=1.0),
    )
    outputs = (
        Output("image", IMAGE, "The fitted and padded image, exactly width x height."),
        Output("mask", MASK, "1 on the padding, 0 on the picture: lets an inpainting sampler fill the border."),
    )

    def run(
        self, ctx: RunContext, image: torch.Tensor, width: int, height: int, interpolation: str, pad_value: float
    ) -> dict[str, Any]:
        padded, mask = resize_pad(image, width, height, interpolation, pad_value)
        return {"image": padded, "mask": mask}


NODES = (LoadImage, LoadMask, SaveImage, ResizePad)
