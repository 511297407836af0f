"""Masks and compositing through them: MaskBlend, FeatherMask, GrowMask, InvertMask, masks made from images
(ImageToMask, ColorToMask, ThresholdMask), and cropping to a mask and pasting back (CropToMask, PasteCrop)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from graphflow.node import Input, Node, Output
from graphflow.types import FLOAT, IMAGE, INT, MASK, STRING
from nodes.image import CHANNEL_WEIGHTS
from nodes.imaging import map_items, resize

if TYPE_CHECKING:
    import torch

_FEATHER_DESCRIPTION = "Blur radius in pixels; 0 keeps hard edges."


def feather_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """A MASK blurred by a Gaussian of kernel 2*radius+1 and sigma radius/3."""
    if radius == 0:
        return mask
    import cv2

    size = 2 * radius + 1
    # sigma = radius/3 puts the kernel's edge at 3 sigma, so the blur reaches `radius` pixels and no further.
    return map_items(mask, lambda item: cv2.GaussianBlur(item, (size, size), radius / 3))


def check_same_size(**batches: torch.Tensor) -> None:
    """Raise NodeInputError unless all batches have one height and width, and batch sizes equal or 1."""
    sizes = {name: f"{batch.shape[2]}x{batch.shape[1]}" for name, batch in batches.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} is {size}" for name, size in sizes.items())
        raise NodeInputError(f"sizes differ (width x height): {listed}; resize them to one size, e.g. with ResizePad")
    check_batches(**batches)


def check_batches(**batches: torch.Tensor) -> None:
    """Raise NodeInputError unless the batch sizes are equal or 1."""
    if len({batch.shape[0] for batch in batches.values()} - {1}) > 1:
        listed = ", ".join(f"{name} has {batch.shape[0]}" for name, batch in batches.items())
        raise NodeInputError(f"batch sizes differ: {listed}; each must be 1 or the same number")


class MaskBlend(Node):
    """Composite a foreground over a background through a mask: background where 0, foreground where 1."""

    category = "mask"
    inputs = (
        Input("background", IMAGE, "The image kept where the mask is 0."),
        Input("foreground", IMAGE, "The image shown where the mask is 1; same size as the background."),
        Input("mask", MASK, "Blend weight of the foreground; a batch of 1 applies to every image."),
        Input("feather", INT, _FEATHER_DESCRIPTION + " Softens the seam, as FeatherMask does.",
              default=0, min=0, max=512),
    )
    outputs = (Output("image", IMAGE, "background * (1 - mask) + foreground * mask."),)

    def run(
        self, ctx: RunContext, background: torch.Tensor, foreground: torch.Tensor, mask: torch.Tensor, feather: int
    ) -> dict[str, Any]:
        check_same_size(background=background, foreground=foreground, mask=mask)
        weight = feather_mask(mask, feather).to(background.device).unsqueeze(-1)
        return {"image": background * (1 - weight) + foreground.to(background.device) * weight}


class FeatherMask(Node):
    """Soften a mask's edges with a Gaussian blur."""

    category = "mask"
    inputs = (
        Input("mask", MASK, "The mask to soften."),
        Input("radius", INT, _FEATHER_DESCRIPTION + " The kernel is 2*radius+1 wide with sigma radius/3.",
              default=8, min=0, max=512),
    )
    outputs = (Output("mask", MASK, "The blurred mask."),)

    def run(self, ctx: RunContext, mask: torch.Tensor, radius: int) -> dict[str, Any]:
        return {"mask": feather_mask(mask, radius)}


class GrowMask(Node):
    """Grow a mask outwards (dilate) or shrink it (erode) by a number of pixels."""

    category = "mask"
    inputs = (
        Input("mask", MASK, "The mask to grow or shrink."),
        Input("pixels", INT, "Positive grows the selected area by this many pixels, negative shrinks it; "
              "the kernel is a disc of diameter 2*|pixels|+1.", default=4, min=-512, max=512),
    )
    outputs = (Output("mask", MASK, "The grown or shrunk mask."),)

    def run(self, ctx: RunContext, mask: torch.Tensor, pixels: int) -> dict[str, Any]:
        if pixels == 0:
            return {"mask": mask}
        import cv2

        size = 2 * abs(pixels) + 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        morph = cv2.dilate if pixels > 0 else cv2.erode
        return {"mask": map_items(mask, lambda item: morph(item, kernel))}


class InvertMask(Node):
    """Swap the selected and kept areas of a mask: 1 - mask."""

    category = "mask"
    inputs = (Input("mask", MASK, "The mask to invert."),)
    outputs = (Output("mask", MASK, "1 - mask."),)

    def run(self, ctx: RunContext, mask: torch.Tensor) -> dict[str, Any]:
        return {"mask": 1 - mask}


class ImageToMask(Node):
    """One channel of an image, or its luminance, as a MASK."""

    category = "mask"
    inputs = (
        Input("image", IMAGE, "The image to take the mask from."),
        Input("channel", STRING, "luminance (BT.601 grey, as LoadMask), red, green or blue: white / full = 1.",
              default="luminance", choices=tuple(CHANNEL_WEIGHTS)),
    )
    outputs = (Output("mask", MASK, "The channel's values as the mask."),)

    def run(self, ctx: RunContext, image: torch.Tensor, channel: str) -> dict[str, Any]:
        import torch

        return {"mask": image @ torch.tensor(CHANNEL_WEIGHTS[channel], dtype=torch.float32, device=image.device)}


class ColorToMask(Node):
    """Select the pixels of one colour: 1 where every channel is within `tolerance` of it, 0 elsewhere."""

    category = "mask"
    inputs = (
        Input("image", IMAGE, "The image to select from (e.g. a segmentation map or a painted mask)."),
        Input("red", INT, "Red of the colour, 0..255.", default=255, min=0, max=255),
        Input("green", INT, "Green of the colour, 0..255.", default=255, min=0, max=255),
        Input("blue", INT, "Blue of the colour, 0..255.", default=255, min=0, max=255),
        Input("tolerance", INT, "Largest difference per channel, in 0..255 steps, still counted as the colour.",
              default=0, min=0, max=255),
    )
    outputs = (Output("mask", MASK, "1 on pixels of the colour, 0 elsewhere."),)

    def run(self, ctx: RunContext, image: torch.Tensor, red: int, green: int, blue: int,
            tolerance: int) -> dict[str, Any]:
        import torch

        from nodes.imaging import to_uint8

        pixels = torch.from_numpy(to_uint8(image)).to(image.device, torch.int16)
        distance = (pixels - torch.tensor([red, green, blue], device=image.device)).abs().amax(dim=-1)
        return {"mask": (distance <= tolerance).float()}


class ThresholdMask(Node):
    """Make a soft mask hard: 1 where it is above a threshold, 0 elsewhere."""

    category = "mask"
    inputs = (
        Input("mask", MASK, "The mask to binarise."),
        Input("threshold", FLOAT, "Values above this become 1, the rest 0.", default=0.5, min=0.0, max=1.0),
    )
    outputs = (Output("mask", MASK, "The hard mask."),)

    def run(self, ctx: RunContext, mask: torch.Tensor, threshold: float) -> dict[str, Any]:
        return {"mask": (mask > threshold).float()}


def mask_box(mask: torch.Tensor, padding: int, multiple: int = 1) -> tuple[int, int, int, int]:
    """(x, y, width, height) of the smallest box around every non-zero pixel of a MASK batch, grown by `padding`
    on each side and clipped to the image, then grown (or, at the image's edges, shrunk) to whole `multiple`s;
    the whole image when the mask is empty."""
    import torch

    rows, columns = mask.shape[1:3]
    selected = mask > 0
    row_hits = torch.nonzero(selected.any(dim=(0, 2))).flatten().tolist()
    column_hits = torch.nonzero(selected.any(dim=(0, 1))).flatten().tolist()
    if not row_hits:
        return 0, 0, columns, rows
    top, left = max(0, row_hits[0] - padding), max(0, column_hits[0] - padding)
    bottom, right = min(rows, row_hits[-1] + 1 + padding), min(columns, column_hits[-1] + 1 + padding)
    left, width = _whole_multiples(left, right - left, columns, multiple)
    top, height = _whole_multiples(top, bottom - top, rows, multiple)
    return left, top, width, height


def _whole_multiples(start: int, length: int, limit: int, multiple: int) -> tuple[int, int]:
    """Grow [start, start + length) to a multiple of `multiple` inside [0, limit), centred where it can be."""
    target = min(-(-length // multiple) * multiple, limit // multiple * multiple) or length
    start = max(0, min(start - (target - length) // 2, limit - target))
    return start, target


class CropToMask(Node):
    """Crop an image and its mask to the mask's bounding box plus padding, e.g. to inpaint a small area in detail.

    PasteCrop puts the (processed) crop back at x, y.
    """

    category = "mask"
    inputs = (
        Input("image", IMAGE, "The image to crop."),
        Input("mask", MASK, "Its mask; the box encloses every non-zero pixel of every mask in the batch."),
        Input("padding", INT, "Pixels of context added around the box on each side (clipped at the image's edges).",
              default=32, min=0, max=16384),
        Input("multiple", INT, "Make the crop's width and height multiples of this (8 = whole latents, so the crop "
              "can go straight to VAEEncode); the box grows around its centre, within the image.",
              default=8, min=1, max=512),
    )
    outputs = (
        Output("image", IMAGE, "The cropped image (the whole image when the mask is empty)."),
        Output("mask", MASK, "The mask cropped the same way."),
        Output("x", INT, "Left edge of the crop in the image, for PasteCrop."),
        Output("y", INT, "Top edge of the crop in the image, for PasteCrop."),
        Output("width", INT, "Width of the crop."),
        Output("height", INT, "Height of the crop."),
    )

    def run(self, ctx: RunContext, image: torch.Tensor, mask: torch.Tensor, padding: int,
            multiple: int) -> dict[str, Any]:
        check_same_size(image=image, mask=mask)
        x, y, width, height = mask_box(mask, padding, multiple)
        region = (slice(None), slice(y, y + height), slice(x, x + width))
        return {"image": image[region].contiguous(), "mask": mask[region].contiguous(),
                "x": x, "y": y, "width": width, "height": height}


class PasteCrop(Node):
    """Paste a crop (as CropToMask made it, then processed) back into the image at x, y, through an optional mask."""

    category = "mask"
    inputs = (
        Input("image", IMAGE, "The image to paste into."),
        Input("crop", IMAGE, "The crop; resized (lanczos) to width x height when its size differs, e.g. after "
              "it was rendered at a larger size."),
        Input("x", INT, "Left edge of the crop in the image.", min=0),
        Input("y", INT, "Top edge of the crop in the image.", min=0),
        Input("width", INT, "Width of the pasted area.", min=1),
        Input("height", INT, "Height of the pasted area.", min=1),
        Input("mask", MASK, "Where the crop replaces the image (1) or keeps it (0), at the crop's size or the "
              "pasted area's; without one the whole area is replaced.", optional=True),
        Input("feather", INT, _FEATHER_DESCRIPTION + " Softens the mask's edge, as FeatherMask does.",
              default=0, min=0, max=512),
    )
    outputs = (Output("image", IMAGE, "The image with the crop pasted in."),)

    def run(self, ctx: RunContext, image: torch.Tensor, crop: torch.Tensor, x: int, y: int, width: int,
            height: int, mask: torch.Tensor | None, feather: int) -> dict[str, Any]:
        import torch

        rows, columns = image.shape[1:3]
        if x + width > columns or y + height > rows:
            raise NodeInputError(f"the area x={x}, y={y}, {width}x{height} does not fit in the {columns}x{rows} "
                                 "image; paste into the image the crop was cut from")
        if mask is not None and mask.shape[1:3] not in (crop.shape[1:3], (height, width)):
            raise NodeInputError(f"the mask is {mask.shape[2]}x{mask.shape[1]}; it must match the crop "
                                 f"({crop.shape[2]}x{crop.shape[1]}) or the pasted area ({width}x{height})")
        check_batches(image=image, crop=crop, **({} if mask is None else {"mask": mask}))
        crop = _sized(crop, width, height, "lanczos").to(image.device)
        weight = torch.ones((1, height, width), dtype=torch.float32, device=image.device) if mask is None \
            else feather_mask(_sized(mask, width, height, "bilinear"), feather).to(image.device)
        weight = weight.unsqueeze(-1)
        region = (slice(None), slice(y, y + height), slice(x, x + width))
        pasted = image.expand(max(image.shape[0], crop.shape[0], weight.shape[0]), -1, -1, -1).clone()
        pasted[region] = image[region] * (1 - weight) + crop * weight
        return {"image": pasted}


def _sized(batch: torch.Tensor, width: int, height: int, interpolation: str) -> torch.Tensor:
    return batch if batch.shape[1:3] == (height, width) else resize(batch, width, height, interpolation)


NODES = (MaskBlend, FeatherMask, GrowMask, InvertMask, ImageToMask, ColorToMask, ThresholdMask, CropToMask, PasteCrop)
