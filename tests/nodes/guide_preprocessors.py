"""The production ControlNet guide's two preprocessors, written from its outline: the references that Canny
(`resize_order: edges_first`) and Depth (`resolution: model`) must equal pixel for pixel.

They are the guide's code, quirks included (truncated fitted sides, OpenCV's default bilinear resize of the
edge map, 8-bit truncation of the depth map), not graphflow's; keep them as the guide has them.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image


class AdaptiveCannyPreprocessor:
    """The guide's Canny: adaptive-median (or fixed) thresholds, edges at full size, fitted and padded to a size."""

    def __init__(self, low_threshold: int = 100, high_threshold: int = 200, adaptive: bool = True) -> None:
        self.low_threshold, self.high_threshold, self.adaptive = low_threshold, high_threshold, adaptive

    def __call__(self, image: Image.Image, target_size: tuple[int, int] = (512, 512)) -> Image.Image:
        image = np.array(image)
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if self.adaptive:
            median = np.median(gray)
            sigma = 0.33
            low = int(max(0, (1.0 - sigma) * median))
            high = int(min(255, (1.0 + sigma) * median))
        else:
            low, high = self.low_threshold, self.high_threshold
        edges = cv2.Canny(gray, low, high)
        h, w = edges.shape[:2]
        target_w, target_h = target_size
        scale = min(target_w / w, target_h / h)
        new_w, new_h = int(w * scale), int(h * scale)
        resized = cv2.resize(edges, (new_w, new_h))
        pad_w, pad_h = (target_w - new_w) // 2, (target_h - new_h) // 2
        padded = np.zeros((target_h, target_w), dtype=np.uint8)
        padded[pad_h:pad_h + new_h, pad_w:pad_w + new_w] = resized
        return Image.fromarray(np.stack([padded] * 3, axis=-1))


class DepthPreprocessor:
    """The guide's depth: a DPT model's prediction at its output size, min-max stretched, truncated to 8 bits."""

    def __init__(self, model_name: str | Path = "Intel/dpt-large") -> None:
        from transformers import DPTForDepthEstimation, DPTImageProcessor

        self.processor = DPTImageProcessor.from_pretrained(model_name)
        self.model = DPTForDepthEstimation.from_pretrained(model_name)

    def __call__(self, image: Image.Image) -> Image.Image:
        inputs = self.processor(images=image, return_tensors="pt")
        with torch.no_grad():
            predicted_depth = self.model(**inputs).predicted_depth
        depth = predicted_depth.squeeze().cpu().numpy()
        depth = (depth - depth.min()) / (depth.max() - depth.min())
        depth = (depth * 255).astype(np.uint8)
        return Image.fromarray(depth).convert("RGB")
