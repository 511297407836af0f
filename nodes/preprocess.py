"""Control images made from photos for ControlNet: Canny."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from graphflow.context import RunContext
from graphflow.node import Input, Node, Output
from graphflow.types import IMAGE, INT
from nodes.imaging import from_uint8, grey_to_rgb, to_uint8

if TYPE_CHECKING:
    import numpy as np
    import torch


def canny_edges(rgb: np.ndarray, low: int, high: int) -> np.ndarray:
    """Canny edges of one uint8 RGB image [H, W, 3] as uint8 [H, W]: 255 on edges, 0 elsewhere."""
    import cv2

    return cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), low, high)


class Canny(Node):
    """Canny edge map of an image: white edges on black, the control image of ControlNet canny models."""

    category = "preprocess"
    disk_cache = True
    inputs = (
        Input("image", IMAGE, "The image to find edges in."),
        Input("low", INT, "Lower threshold on the gradient: weaker gradients are never edges, gradients between "
              "low and high are edges only where they connect to a strong one.", default=100, min=0, max=255),
        Input("high", INT, "Upper threshold on the gradient: stronger gradients are always edges. Lower both "
              "for more detail, raise them for only the main outlines.", default=200, min=0, max=255),
    )
    outputs = (Output("image", IMAGE, "The edge map: 1 on edges, 0 elsewhere, in all three channels."),)

    def run(self, ctx: RunContext, image: torch.Tensor, low: int, high: int) -> dict[str, Any]:
        import numpy as np

        edges = np.stack([canny_edges(rgb, low, high) for rgb in to_uint8(image)])
        return {"image": grey_to_rgb(from_uint8(edges, image.device))}


NODES = (Canny,)
