"""Inpainting a region around the mask at the full output size, as diffusers' `padding_mask_crop` does:
InpaintCrop and InpaintPaste.

StableDiffusionControlNetInpaintPipeline(..., padding_mask_crop=N) takes the mask's bounding box plus N pixels,
grows it to the output's aspect ratio (`get_crop_region`), crops the image, the mask and the control image to it
and resizes each to the output size keeping its aspect ratio, filling any band left over with its edge rows or
columns (`resize_mode="fill"`); after decoding, it scales the render back over the region and lays the original
image on top through the inverted mask (`apply_overlay`), so pixels outside the mask are the original's exactly.
The functions here make the same Pillow calls on the same 8-bit pictures, so the pixels are the pipeline's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from graphflow.node import Input, Node, Output
from graphflow.types import IMAGE, INT, MASK
from nodes.imaging import from_pictures, to_pictures, to_uint8
from nodes.latents import check_size
from nodes.mask import check_batches, check_same_size

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

_MAX_SIDE = 16384
_SIZE_MULTIPLE = 8  # the pipelines round a default size down to whole latents of an SD VAE
_REGION = ("left", "top", "right", "bottom")


def crop_region(mask: np.ndarray, width: int, height: int, padding: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the smallest box around the non-zero pixels of an 8-bit mask [H, W], grown by
    `padding` on each side within the image, then grown to the aspect ratio of width x height as far as the image
    allows: diffusers' `get_crop_region`. An empty mask gives the whole image."""
    import numpy as np

    rows, columns = mask.shape
    hit_rows, hit_columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if hit_rows.size == 0:
        left, top, right, bottom = 0, 0, columns, rows
    else:
        left, top = max(int(hit_columns[0]) - padding, 0), max(int(hit_rows[0]) - padding, 0)
        right, bottom = min(int(hit_columns[-1]) + 1 + padding, columns), min(int(hit_rows[-1]) + 1 + padding, rows)
    # the same float expressions as diffusers: a different rounding would move the box by a pixel
    ratio = width / height
    if (right - left) / (bottom - top) > ratio:
        top, bottom = _grown(top, bottom, (right - left) / ratio, rows)
    else:
        left, right = _grown(left, right, (bottom - top) * ratio, columns)
    return left, top, right, bottom


def _grown(start: int, end: int, desired: float, limit: int) -> tuple[int, int]:
    """[start, end) grown around its middle to int(desired) long, shifted back inside [0, limit), cut at limit."""
    extra = int(desired - (end - start))
    start, end = start - extra // 2, end + extra - extra // 2
    if end >= limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def _scaled(picture: Image.Image, width: int, height: int, cover: bool) -> tuple[Image.Image, int, int]:
    """The picture resized (Lanczos) keeping its aspect ratio to fit inside width x height (or to cover it), and
    where it goes on that canvas, centred: diffusers' `_resize_and_fill` / `_resize_and_crop` sizes."""
    from PIL import Image

    ratio, own_ratio = width / height, picture.width / picture.height
    width_bound = ratio > own_ratio if cover else ratio < own_ratio
    # at least a pixel: a strip far flatter than the output (9x1 into 8x8) would round to no rows, where diffusers fails
    fit_width = width if width_bound else max(1, picture.width * height // picture.height)
    fit_height = max(1, picture.height * width // picture.width) if width_bound else height
    resized = picture.resize((fit_width, fit_height), resample=Image.Resampling.LANCZOS)
    return resized, width // 2 - fit_width // 2, height // 2 - fit_height // 2


def fill_resize(picture: Image.Image, width: int, height: int) -> Image.Image:
    """The picture fitted inside width x height, the bands left over filled by stretching its edge rows or columns
    across them: diffusers' `resize_mode="fill"` (its canvas is black, so a band one pixel taller than its
    opposite keeps a black line)."""
    from PIL import Image

    resized, left, top = _scaled(picture, width, height, cover=False)
    canvas = Image.new(picture.mode, (width, height))
    canvas.paste(resized, box=(left, top))
    ratio, own_ratio = width / height, picture.width / picture.height
    if ratio < own_ratio and top > 0:
        canvas.paste(resized.resize((width, top), box=(0, 0, width, 0)), box=(0, 0))
        canvas.paste(resized.resize((width, top), box=(0, resized.height, width, resized.height)),
                     box=(0, top + resized.height))
    elif ratio > own_ratio and left > 0:
        canvas.paste(resized.resize((left, height), box=(0, 0, 0, height)), box=(0, 0))
        canvas.paste(resized.resize((left, height), box=(resized.width, 0, resized.width, height)),
                     box=(left + resized.width, 0))
    return canvas


def overlay(original: Image.Image, mask: Image.Image, render: Image.Image,
            region: tuple[int, int, int, int]) -> Image.Image:
    """The render scaled to cover the region (Lanczos, centred, the excess cut), on black elsewhere, with the
    original alpha-composited on top through the inverted 8-bit mask: diffusers' `apply_overlay`."""
    from PIL import Image, ImageOps

    left, top, right, bottom = region
    kept = Image.new("RGBa", original.size)
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    scaled, x, y = _scaled(render, right - left, bottom - top, cover=True)
    fitted = Image.new("RGB", (right - left, bottom - top))
    fitted.paste(scaled, box=(x, y))
    composite = Image.new("RGBA", original.size)
    composite.paste(fitted, box=(left, top))
    composite = composite.convert("RGB").convert("RGBA")
    composite.alpha_composite(kept.convert("RGBA"))
    return composite.convert("RGB")


def _mask_union(mask: torch.Tensor) -> np.ndarray:
    """The 8-bit mask [H, W] selecting every pixel any mask of the batch selects."""
    return to_uint8(mask).max(axis=0)


class InpaintCrop(Node):
    """Crop an image and its mask to a region around the mask, resized to the output size: padding_mask_crop.

    Render the crop (VAEEncode with the mask, Sampler, VAEDecode) and put it back with InpaintPaste. Crop each
    control image with an InpaintCrop of its own (same mask, padding and size): the pipeline crops its control
    images to the same region.
    """

    category = "mask"
    inputs = (
        Input("image", IMAGE, "The image to inpaint (or a control image made from it, the same size)."),
        Input("mask", MASK, "1 (white) = repaint; its 8-bit values are what counts, as the pipeline's mask image. "
              "The region encloses every non-zero pixel of every mask in the batch (the whole image if none)."),
        Input("padding", INT, "The pipeline's padding_mask_crop: pixels added around the mask's box on each side "
              "before it grows to the output's aspect ratio (both within the image).", default=32, min=0,
              max=_MAX_SIDE),
        Input("width", INT, "Output width in pixels, a multiple of 8, as the pipeline's width; 0 takes the image's, "
              "rounded down to a multiple of 8.", default=0, min=0, max=_MAX_SIDE),
        Input("height", INT, "Output height, like width.", default=0, min=0, max=_MAX_SIDE),
    )
    outputs = (
        Output("image", IMAGE, "The region at width x height: resized keeping its aspect ratio (Lanczos, 8-bit), "
               "any band left over filled with its edge rows or columns, as the pipeline's resize_mode='fill'."),
        Output("mask", MASK, "The mask cropped and resized the same way; VAEEncode and the Sampler binarise it at "
               "0.5, as the pipeline does."),
        Output("left", INT, "Left edge of the region in the image, for InpaintPaste."),
        Output("top", INT, "Top edge of the region."),
        Output("right", INT, "Right edge of the region (exclusive)."),
        Output("bottom", INT, "Bottom edge of the region (exclusive)."),
    )

    def run(self, ctx: RunContext, image: torch.Tensor, mask: torch.Tensor, padding: int, width: int,
            height: int) -> dict[str, Any]:
        check_same_size(image=image, mask=mask)
        rows, columns = image.shape[1:3]
        width = width or columns - columns % _SIZE_MULTIPLE
        height = height or rows - rows % _SIZE_MULTIPLE
        if width == 0 or height == 0:
            raise NodeInputError(f"the image is {columns}x{rows}, under 8 pixels on a side; set width and height")
        check_size(width, height, "the output size", " (whole latents, for VAEEncode); set InpaintCrop's width and "
                   "height so, or 0 for the image's size rounded down")
        region = crop_region(_mask_union(mask), width, height, padding)
        crops = {name: from_pictures([fill_resize(picture.crop(region), width, height)
                                      for picture in to_pictures(batch)])
                 for name, batch in (("image", image), ("mask", mask))}
        return crops | dict(zip(_REGION, region, strict=True))


class InpaintPaste(Node):
    """Put a render of InpaintCrop's region back into the image, keeping the image outside the mask exactly.

    The end of diffusers' padding_mask_crop (its `apply_overlay`).
    """

    category = "mask"
    inputs = (
        Input("image", IMAGE, "The image InpaintCrop cropped."),
        Input("mask", MASK, "The mask given to InpaintCrop: the image is kept where it is 0 and the render shows "
              "where it is 1 (in between they blend, in 8-bit RGBA as the pipeline composites)."),
        Input("render", IMAGE, "The inpainted crop, e.g. from VAEDecode; scaled to cover the region (Lanczos, "
              "centred, the excess cut)."),
        Input("left", INT, "Left edge of the region, from InpaintCrop.", min=0, max=_MAX_SIDE),
        Input("top", INT, "Top edge of the region.", min=0, max=_MAX_SIDE),
        Input("right", INT, "Right edge of the region (exclusive).", min=1, max=_MAX_SIDE),
        Input("bottom", INT, "Bottom edge of the region (exclusive).", min=1, max=_MAX_SIDE),
    )
    outputs = (Output("image", IMAGE, "The image with the render inside the mask, the original outside it."),)

    def run(self, ctx: RunContext, image: torch.Tensor, mask: torch.Tensor, render: torch.Tensor, left: int,
            top: int, right: int, bottom: int) -> dict[str, Any]:
        check_same_size(image=image, mask=mask)
        check_batches(image=image, mask=mask, render=render)
        rows, columns = image.shape[1:3]
        if not (left < right <= columns and top < bottom <= rows):
            raise NodeInputError(f"the region left={left}, top={top}, right={right}, bottom={bottom} is not inside "
                                 f"the {columns}x{rows} image; link InpaintCrop's region of this image")
        originals, masks, renders = to_pictures(image), to_pictures(mask), to_pictures(render)
        count = max(len(originals), len(masks), len(renders))
        region = (left, top, right, bottom)
        return {"image": from_pictures([overlay(originals[index % len(originals)], masks[index % len(masks)],
                                         renders[index % len(renders)], region) for index in range(count)])}


NODES = (InpaintCrop, InpaintPaste)
