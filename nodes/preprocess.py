"""Control images made from photos for ControlNet: Canny edges and Depth maps.

`model_source` finds the files of a preprocessor model (a local folder, `tiny:NAME`, or a hub
repository in the Hugging Face cache); the controlnet_aux detectors in nodes.annotators use it too.
"""

from __future__ import annotations

from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphflow.context import RunContext
from graphflow.node import Input, Node, Output
from graphflow.types import FLOAT, IMAGE, INT, STRING
from nodes.imaging import INTERPOLATIONS, fit_box, from_uint8, grey_to_rgb, pad, resize, to_pictures, to_uint8

if TYPE_CHECKING:
    import numpy as np
    import torch

    from graphflow.models.sources import ModelSource

THRESHOLDS = ("fixed", "adaptive")
CHANNELS = ("grey", "per_channel")
RESIZE_ORDERS = ("image_first", "edges_first")
DEPTH_RESOLUTIONS = ("input", "model")
DEPTH_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")
_MODEL_SOURCE = ("A Hugging Face hub id (its files are taken from the HF cache, downloaded there first when the hub "
                 "is reachable) or a local folder holding the same files, relative to the input directory.")


def median_thresholds(channel: np.ndarray, sigma: float) -> tuple[int, int]:
    """Canny thresholds around the median: (max(0, (1 - sigma) * median), min(255, (1 + sigma) * median)), truncated."""
    import numpy as np

    median = float(np.median(channel))
    return int(max(0.0, (1 - sigma) * median)), int(min(255.0, (1 + sigma) * median))


def canny_edges(rgb: np.ndarray, low: int, high: int, *, adaptive: bool = False, sigma: float = 0.33,
                blur: int = 0, per_channel: bool = False) -> np.ndarray:
    """Canny edges of one uint8 RGB image [H, W, 3] as uint8 [H, W, 3]: 255 on edges, 0 elsewhere.

    Grey mode finds edges in the luminance and writes them to all three channels; per-channel mode finds
    each colour channel's edges (with its own median thresholds when adaptive) and keeps them in that channel.
    """
    import cv2
    import numpy as np

    planes = [rgb[..., index] for index in range(3)] if per_channel else [cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)]
    edges = []
    for plane in planes:
        if blur:
            plane = cv2.GaussianBlur(plane, (2 * blur + 1, 2 * blur + 1), 0)
        lower, upper = median_thresholds(plane, sigma) if adaptive else (low, high)
        edges.append(cv2.Canny(plane, lower, upper))
    return np.stack(edges * 3 if len(edges) == 1 else edges, axis=-1)


class Canny(Node):
    """Canny edge map of an image: white edges on black, the control image of ControlNet canny models."""

    category = "preprocess"
    version = "1.2.0"
    disk_cache = True
    inputs = (
        Input("image", IMAGE, "The image to find edges in."),
        Input("low", INT, "Lower threshold on the gradient (fixed thresholds): weaker gradients are never edges, "
              "gradients between low and high are edges only where they connect to a strong one.",
              default=100, min=0, max=255),
        Input("high", INT, "Upper threshold on the gradient (fixed thresholds): stronger gradients are always edges. "
              "Lower both for more detail, raise them for only the main outlines.", default=200, min=0, max=255),
        Input("thresholds", STRING, "fixed uses low and high; adaptive derives them from the median grey level m of "
              "each image: low = max(0, (1 - sigma) * m), high = min(255, (1 + sigma) * m).",
              default="fixed", choices=THRESHOLDS),
        Input("sigma", FLOAT, "Spread of the adaptive thresholds around the median: larger sets them further apart "
              "(a lower low and a higher high).", default=0.33, min=0.0, max=1.0),
        Input("blur", INT, "Gaussian blur radius applied before edge detection (kernel 2*blur+1, sigma from the "
              "kernel size as OpenCV derives it); 0 = no blur. Blur suppresses edges from noise and texture.",
              default=0, min=0, max=64),
        Input("channels", STRING, "grey finds edges in the luminance (white edges); per_channel finds them in "
              "red, green and blue separately and keeps each in its own channel.", default="grey", choices=CHANNELS),
        Input("width", INT, "Output width: the picture is fitted inside width x height keeping its aspect ratio "
              "(see resize_order) and the map is centred on a black border. 0 = the input's width.",
              default=0, min=0, max=16384),
        Input("height", INT, "Output height, as for width; 0 = the input's height.", default=0, min=0, max=16384),
        Input("resize_order", STRING, "image_first resizes the image to the fitted size (sides rounded) with "
              "interpolation and finds the edges there: thin, pure white lines. edges_first finds the edges at the "
              "input's size, then resizes the edge map to the fitted size (sides truncated) bilinearly, OpenCV's "
              "default, which greys and thickens the lines: the production ControlNet guide's "
              "AdaptiveCannyPreprocessor, pixel for pixel.", default="image_first", choices=RESIZE_ORDERS),
        Input("interpolation", STRING, "Resampling filter for the image before edge detection (resize_order "
              "image_first). edges_first always resizes the edge map bilinearly, as the guide does.",
              default="lanczos", choices=INTERPOLATIONS),
    )
    outputs = (Output("image", IMAGE, "The edge map in three channels: 1 on edges, 0 elsewhere (and on the border); "
                      "with edges_first, the grey levels k/255 that resizing left."),)

    def run(self, ctx: RunContext, image: torch.Tensor, low: int, high: int, thresholds: str, sigma: float,
            blur: int, channels: str, width: int, height: int, resize_order: str,
            interpolation: str) -> dict[str, Any]:
        import numpy as np

        rows, columns = image.shape[1:3]
        width, height = width or columns, height or rows
        edges_first = resize_order == "edges_first"
        fit_width, fit_height, left, top = fit_box(columns, rows, width, height, truncate=edges_first)
        if not edges_first and (fit_width, fit_height) != (columns, rows):
            image = resize(image, fit_width, fit_height, interpolation)
        edges = np.stack([canny_edges(rgb, low, high, adaptive=thresholds == "adaptive", sigma=sigma, blur=blur,
                                      per_channel=channels == "per_channel") for rgb in to_uint8(image)])
        if edges.shape[1:3] != (fit_height, fit_width):
            edges = resize_edges(edges, fit_width, fit_height)
        edge_map = from_uint8(edges, image.device)
        if (fit_width, fit_height) != (width, height):
            edge_map, _ = pad(edge_map, width, height, left, top, 0.0)
        return {"image": edge_map}


def resize_edges(edges: np.ndarray, width: int, height: int) -> np.ndarray:
    """8-bit edge maps [B, H, W, 3] resized to width x height as the guide resizes them: cv2.resize's default,
    bilinear on the 8-bit values (OpenCV's fixed-point rounding, which a float resize would not reproduce)."""
    import cv2
    import numpy as np

    return np.stack([cv2.resize(item, (width, height), interpolation=cv2.INTER_LINEAR) for item in edges])


class Depth(Node):
    """Relative depth of an image from a DPT / MiDaS model (transformers): near is bright, as depth ControlNets want."""

    category = "preprocess"
    version = "1.1.0"
    disk_cache = True
    uses_options = ("device", "dtype")
    inputs = (
        Input("image", IMAGE, "The image to estimate depth for."),
        Input("model", STRING, "Depth-estimation model: Intel/dpt-large, Intel/dpt-hybrid-midas, or another "
              "transformers depth model (config.json, preprocessor_config.json, model.safetensors). " + _MODEL_SOURCE,
              default="Intel/dpt-large", model=True),
        Input("resolution", STRING, "input resizes the model's prediction to the input's size as its image "
              "processor does (bicubic for DPT) and keeps the values in float: transformers' depth-estimation "
              "pipeline. model keeps the prediction at the model's output size (the size its image processor "
              "resizes to) and truncates the values to 8 bits (k/255): the production ControlNet guide's "
              "DepthPreprocessor. Both pixel for pixel on the CPU in fp32.",
              default="input", choices=DEPTH_RESOLUTIONS),
    )
    outputs = (Output("image", IMAGE, "The depth map, stretched so that the farthest point is 0 and the nearest 1, in "
                      "all three channels, at the size resolution chooses."),)

    def run(self, ctx: RunContext, image: torch.Tensor, model: str, resolution: str) -> dict[str, Any]:
        import torch
        from transformers.modeling_outputs import DepthEstimatorOutput

        from graphflow.models import ModelKey, placement, torch_dtype
        from graphflow.models.sources import verified

        source = model_source(ctx, model, DEPTH_FILES)
        device, dtype = placement(ctx.options)
        handle = ctx.models.handle(ModelKey("depth", source.key, dtype=dtype, device=device),
                                   verified(partial(_load_depth_model, source.path, dtype), source))
        processor = _load_depth_processor(source)
        pictures = to_pictures(image)
        pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
        # one picture per forward pass, as the depth-estimation pipeline and the guide run them: a batched pass
        # rounds differently (~1e-6 relative), enough to move an 8-bit step
        with handle.use() as network, torch.inference_mode():
            predicted = torch.cat([network(pixel_values=item[None].to(device, torch_dtype(dtype))).predicted_depth
                                   for item in pixels]).float()
        sizes = [tuple(image.shape[1:3])] * len(pictures) if resolution == "input" else None  # None: as predicted
        # positional, as transformers' depth-estimation pipeline passes it (ZoeDepth calls it source_sizes)
        results = processor.post_process_depth_estimation(DepthEstimatorOutput(predicted_depth=predicted), sizes)
        depth = torch.stack([normalise(result["predicted_depth"]) for result in results])
        if resolution == "model":
            depth = eight_bit(depth)
        return {"image": grey_to_rgb(depth.to(image.device, torch.float32))}


def normalise(depth: torch.Tensor) -> torch.Tensor:
    """Values stretched to 0..1 (all 0 when the map is flat)."""
    low, high = depth.min(), depth.max()
    return (depth - low) / (high - low) if high > low else depth.new_zeros(depth.shape)


def eight_bit(values: torch.Tensor) -> torch.Tensor:
    """Values in 0..1 truncated to the 8-bit steps k/255, as the guide's `(depth * 255).astype(np.uint8)` does."""
    import torch

    return values.mul(255).to(torch.uint8).float().div(255)


def _load_depth_model(folder: Path, dtype: str) -> Any:
    from transformers import AutoModelForDepthEstimation

    from graphflow.models import torch_dtype
    from graphflow.models.loading import quiet_progress

    with quiet_progress():
        return AutoModelForDepthEstimation.from_pretrained(folder, dtype=torch_dtype(dtype), use_safetensors=True)


@lru_cache(maxsize=4)
def _load_depth_processor(source: ModelSource) -> Any:
    """The model's image processor, read once per source (whose fingerprint changes when its files do), and only
    remembered when its files did not change while it was read."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(source.path)
    source.check_unchanged()
    return processor


def model_source(ctx: RunContext, name: str, files: tuple[str, ...]) -> ModelSource:
    """Where the files of model `name` are: a folder inside the input directories, `tiny:NAME`, or a hub repository
    whose files come from the Hugging Face cache (downloaded into it first when the hub is reachable)."""
    from graphflow.models.sources import locate

    return locate(name, ctx.paths, node=ctx.node, input="model", files=files)


NODES = (Canny, Depth)
