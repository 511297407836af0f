"""Image files in and out, and fitting images to a size: LoadImage, LoadMask, SaveImage, ResizePad."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphflow.atomic import atomic_write
from graphflow.context import RunContext
from graphflow.document import dumps
from graphflow.errors import NodeInputError
from graphflow.node import Input, Node, Output
from graphflow.types import FLOAT, IMAGE, INT, MASK, PATHS, STRING
from nodes.imaging import INTERPOLATIONS, grey_to_rgb, pil_to_tensor, resize_pad, to_uint8

if TYPE_CHECKING:
    import numpy as np
    import torch

_PATH_DESCRIPTION = "Image file (PNG, JPEG, WebP, ...), relative to the input directory."

# Weights that turn RGB into each LoadMask channel; BT.601 luma is what PIL's convert("L") uses.
CHANNEL_WEIGHTS = {
    "luminance": (0.299, 0.587, 0.114),
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
}


def _load(ctx: RunContext, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An image file, upright per its EXIF orientation, as IMAGE and its transparency as MASK (transparent = 1)."""
    import torch
    from PIL import Image, ImageOps

    file = ctx.input_path(path)
    try:
        with Image.open(file) as opened:
            picture = ImageOps.exif_transpose(opened)
    except OSError as error:
        raise NodeInputError(f"cannot read {path} as an image: {error}") from error
    if picture.mode.startswith("I"):  # 16-bit grey, which convert("RGB") would clip at 255
        image = grey_to_rgb(pil_to_tensor(picture))
    else:
        image = pil_to_tensor(picture.convert("RGB"))
    if picture.has_transparency_data:
        mask = 1 - pil_to_tensor(picture.convert("RGBA").getchannel("A"))
    else:
        mask = torch.zeros(image.shape[:3])
    return image, mask


class LoadImage(Node):
    """Read an image file as IMAGE, with a MASK that marks its transparent pixels for repainting."""

    category = "image"
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
        return {"mask": image @ torch.tensor(CHANNEL_WEIGHTS[channel])}


class SaveImage(Node):
    """Write each image of a batch to a PNG under the output directory, with the graph and params embedded."""

    category = "image"
    is_output = True
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
        counter = _first_unused_counter(ctx, prefix)
        paths = []
        for pixels in to_uint8(image):
            path, counter = _write_unused(ctx, prefix, counter, _encode_png(pixels, text))
            ctx.wrote(path)
            paths.append(str(path))
        return {"paths": paths}

    def outputs_still_valid(self, outputs: dict[str, Any]) -> bool:
        return all(Path(path).is_file() for path in outputs["paths"])


def _png_text(ctx: RunContext) -> dict[str, str]:
    """The PNG text chunks: the graph document (when there is one), the params and the library versions."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for package in ("graphflow", "torch", "numpy", "pillow"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:  # graphflow run from a source checkout has no installed metadata
            versions[package] = None
    text = {} if ctx.document is None else {"graphflow": dumps(ctx.document)}
    text["params"] = json.dumps(ctx.params, ensure_ascii=False)
    text["versions"] = json.dumps(versions)
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


def _write_unused(ctx: RunContext, prefix: str, counter: int, data: bytes) -> tuple[Path, int]:
    """Write `data` to the first PREFIX_NNNNN.png from `counter` on that does not exist; return it and the next counter.

    Scanning gave a free counter, but another process may take it first: the exclusive write never replaces a file.
    """
    while True:
        path = ctx.output_path(f"{prefix}_{counter:05d}.png")
        counter += 1
        if atomic_write(path, data, exclusive=True):
            return path, counter


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
