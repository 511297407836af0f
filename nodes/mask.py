"""Mask operations and compositing through a mask: MaskBlend, FeatherMask, GrowMask, InvertMask."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from graphflow.node import Input, Node, Output
from graphflow.types import IMAGE, INT, MASK
from nodes.imaging import map_items

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


def _check_same_size(**batches: torch.Tensor) -> None:
    """Raise NodeInputError unless all batches have one height and width, and batch sizes equal or 1."""
    sizes = {name: f"{batch.shape[2]}x{batch.shape[1]}" for name, batch in batches.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} is {size}" for name, size in sizes.items())
        raise NodeInputError(f"sizes differ (width x height): {listed}; resize them to one size, e.g. with ResizePad")
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
        _check_same_size(background=background, foreground=foreground, mask=mask)
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


NODES = (MaskBlend, FeatherMask, GrowMask, InvertMask)
