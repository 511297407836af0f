"""The controlnet_aux detectors as nodes: HED, MLSD, OpenPose, Lineart, NormalBae, PidiNet, MiDaS, Zoe, ...

Each node is one `Detector` spec turned into a node type by `detector_node`: the controlnet_aux
class, the weight files it loads from its repository (none for detectors made of OpenCV and numpy
alone), its own options, and which of the detect/image resolutions it has. Every node runs the
package's detector as is, so its maps are controlnet_aux's maps, sized as controlnet_aux sizes them:
the short side at image_resolution, both sides rounded to multiples of 64.

Annotator weights are .pth/.pt pickles. graphflow lets controlnet_aux read them only through
`torch.load`'s weights-only unpickler (PyTorch's default since 2.6), which rebuilds tensors and
plain containers and refuses anything else, so a checkpoint cannot run code; see
`require_weights_only_loading`.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from graphflow.context import RunContext
from graphflow.errors import GraphflowError
from graphflow.node import Input, Node, Output
from graphflow.types import BOOL, FLOAT, IMAGE, INT, STRING
from nodes.imaging import from_uint8, to_uint8
from nodes.preprocess import model_source

if TYPE_CHECKING:
    import numpy as np
    import torch

ANNOTATORS = "lllyasviel/Annotators"
_RESOLUTION = {"min": 64, "max": 4096, "default": 512}
_IMAGE = Input("image", IMAGE, "The image to annotate.")
_DETECT_RESOLUTION = Input("detect_resolution", INT, "The image's short side is resized to this (sides rounded to "
                           "multiples of 64) before detection; larger finds finer detail, slower.", **_RESOLUTION)
_IMAGE_RESOLUTION = Input("image_resolution", INT, "The map's short side (sides rounded to multiples of 64). Fit it "
                          "to the render's size with ResizePad.", **_RESOLUTION)


@dataclass(frozen=True)
class Option:
    """A detector argument exposed as a node input; `keyword` is controlnet_aux's name for it."""

    input: Input
    keyword: str


@dataclass(frozen=True)
class Detector:
    """How one controlnet_aux detector becomes a node type."""

    node: str
    detector: str  # class name in controlnet_aux
    doc: str
    output: str
    weights: dict[str, str] = field(default_factory=dict)  # from_pretrained keyword -> file in the repository
    options: tuple[Option, ...] = ()
    image_resolution: bool = True


class WeightsRefusedError(GraphflowError):
    """PyTorch is set to unpickle checkpoints fully, which would let a weights file run code."""


def require_weights_only_loading() -> None:
    """Refuse to load annotator weights unless `torch.load` uses its weights-only unpickler by default."""
    import torch

    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    forced_off = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true")
    if (major, minor) < (2, 6) or forced_off:
        why = ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set" if forced_off
               else f"torch {torch.__version__} is older than 2.6")
        raise WeightsRefusedError(
            f"annotator weights are pickle files, which graphflow loads only with torch.load's weights-only "
            f"unpickler, but {why}, so loading them could run code from the file; unset the variable or "
            "upgrade PyTorch")


class Annotator(Node):
    """Base of the controlnet_aux detector nodes; `spec` says which detector and how."""

    category = "preprocess"
    disk_cache = True
    spec: ClassVar[Detector]

    def run(self, ctx: RunContext, image: torch.Tensor, **values: Any) -> dict[str, Any]:
        import numpy as np

        spec = self.spec
        arguments = {option.keyword: values[option.input.name] for option in spec.options}
        arguments.update({name: values[name] for name in ("detect_resolution", "image_resolution") if name in values})
        with _detector(ctx, spec, values.get("model")) as detect:
            maps = [_rgb(detect(item, output_type="np", **arguments)) for item in to_uint8(image)]
        return {"image": from_uint8(np.stack(maps), image.device)}


def _rgb(detected: np.ndarray) -> np.ndarray:
    """A detector's uint8 map as [H, W, 3] (a few return one channel)."""
    import numpy as np

    return np.repeat(detected[..., None], 3, axis=-1) if detected.ndim == 2 else detected


@contextmanager
def _detector(ctx: RunContext, spec: Detector, model: str | None) -> Iterator[Any]:
    """The spec's detector, ready to call; its networks stay on their device (held) inside the block."""
    if not spec.weights:
        yield detector_class(spec)()
        return
    from graphflow.models import ModelKey, placement
    from graphflow.models.sources import verified

    source = model_source(ctx, model or ANNOTATORS, tuple(spec.weights.values()))
    device, _ = placement(ctx.options)
    # the detectors compute in float32 whatever the engine's dtype
    handle = ctx.models.handle(ModelKey(f"annotator:{spec.node}", source.key, dtype="fp32", device=device),
                               verified(partial(load_detector, spec, source.path), source))
    with handle.use() as networks:
        yield networks.detector


def load_detector(spec: Detector, folder: Path) -> torch.nn.Module:
    """The spec's detector loaded from the weight files in `folder`, as a module the model manager can place.

    The module holds the detector's networks (so moving it moves them) and the detector as `.detector`.
    """
    import torch

    require_weights_only_loading()
    detector = detector_class(spec).from_pretrained(str(folder), **spec.weights)
    networks = torch.nn.ModuleList(_networks(detector))
    networks.detector = detector
    return networks


_IMPORT_LOCK = threading.Lock()


def detector_class(spec: Detector) -> Any:
    """The spec's controlnet_aux class."""
    with _IMPORT_LOCK:
        return getattr(_controlnet_aux(), spec.detector)


@cache
def _controlnet_aux() -> Any:
    """controlnet_aux, imported once. Importing it warns about its own internals (timm's moved modules, re-registered
    models, mediapipe missing), nothing a user can act on; those warnings are silenced. Silencing swaps the process's
    warning filters (`catch_warnings` is not thread-safe), hence once, under `_IMPORT_LOCK`; the environment it
    changes is restored."""
    environment = dict(os.environ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import controlnet_aux
    # its import sets KMP_DUPLICATE_LIB_OK for the whole process (for OpenMP, already loaded by then): put it back
    os.environ.clear()
    os.environ.update(environment)
    return controlnet_aux


def _networks(detector: Any) -> list[torch.nn.Module]:
    """The torch modules a detector holds, directly or one object down (OpenPose keeps them in Body, Hand, Face)."""
    import torch

    found = []
    for value in vars(detector).values():
        if isinstance(value, torch.nn.Module):
            found.append(value)
        elif hasattr(value, "__dict__"):
            found.extend(inner for inner in vars(value).values() if isinstance(inner, torch.nn.Module))
    return found


def detector_node(spec: Detector) -> type[Annotator]:
    """A node type for `spec`: image, the model source (weighted detectors), resolutions, the detector's options."""
    inputs = [_IMAGE]
    if spec.weights:
        files = ", ".join(spec.weights.values())
        inputs.append(Input("model", STRING, f"Where the weights ({files}) come from: a Hugging Face hub repository "
                            "(read from the HF cache, downloaded there first when the hub is reachable) or a local "
                            "folder holding those files, relative to the input directory.", default=ANNOTATORS,
                            model=True))
    inputs.append(_DETECT_RESOLUTION)
    if spec.image_resolution:
        inputs.append(_IMAGE_RESOLUTION)
    output = spec.output if spec.image_resolution else spec.output + " At the input's size."
    inputs.extend(option.input for option in spec.options)
    namespace = {"__doc__": spec.doc, "__qualname__": spec.node, "spec": spec, "inputs": tuple(inputs),
                 "outputs": (Output("image", IMAGE, output),),
                 "uses_options": ("device",) if spec.weights else ()}
    return type(spec.node, (Annotator,), namespace)


def _flag(name: str, description: str) -> Input:
    return Input(name, BOOL, description, default=False)


_SAFE = Option(_flag("safe", "Quantise the soft edges to a few levels, removing faint ones."), "safe")
_SCRIBBLE = Option(_flag("scribble", "Thin, blur and binarise the edges into scribble-like strokes."), "scribble")
_SOFT_EDGES = "Soft edge map: white edges of varying strength on black."

HED = detector_node(Detector(
    "HED", "HEDdetector", "Soft edges from HED (holistically-nested edge detection), for softedge/scribble "
    "ControlNets.",
    _SOFT_EDGES, {"filename": "ControlNetHED.pth"}, (_SAFE, _SCRIBBLE)))
PidiNet = detector_node(Detector(
    "PidiNet", "PidiNetDetector", "Soft edges from PiDiNet (pixel difference networks), for softedge/scribble "
    "ControlNets.", _SOFT_EDGES, {"filename": "table5_pidinet.pth"},
    (_SAFE, _SCRIBBLE, Option(_flag("apply_filter", "Keep only edges stronger than 0.5, as hard white."),
                              "apply_filter"))))
MLSD = detector_node(Detector(
    "MLSD", "MLSDdetector", "Straight line segments (M-LSD), for MLSD ControlNets: architecture and interiors.",
    "White line segments on black.", {"filename": "mlsd_large_512_fp32.pth"},
    (Option(Input("score_threshold", FLOAT, "Minimum confidence of a line; raise it for fewer lines.",
                  default=0.1, min=0.0, max=1.0), "thr_v"),
     Option(Input("distance_threshold", FLOAT, "Minimum length of a line relative to the image; raise it to drop "
                  "short segments.", default=0.1, min=0.0, max=20.0), "thr_d"))))
OpenPose = detector_node(Detector(
    "OpenPose", "OpenposeDetector", "Human poses (OpenPose body, hand and face keypoints), for openpose ControlNets.",
    "Coloured pose skeletons on black.",
    {"filename": "body_pose_model.pth", "hand_filename": "hand_pose_model.pth", "face_filename": "facenet.pth"},
    (Option(Input("include_body", BOOL, "Draw the body skeleton.", default=True), "include_body"),
     Option(_flag("include_hand", "Detect and draw hand keypoints."), "include_hand"),
     Option(_flag("include_face", "Detect and draw face keypoints."), "include_face"))))
Lineart = detector_node(Detector(
    "Lineart", "LineartDetector", "Line drawing of a photo, for lineart ControlNets.", "White lines on black.",
    {"filename": "sk_model.pth", "coarse_filename": "sk_model2.pth"},
    (Option(_flag("coarse", "Use the coarse model: bolder, simpler lines."), "coarse"),)))
LineartAnime = detector_node(Detector(
    "LineartAnime", "LineartAnimeDetector", "Line drawing in anime style, for the anime lineart ControlNet.",
    "White lines on black.", {"filename": "netG.pth"}))
NormalBae = detector_node(Detector(
    "NormalBae", "NormalBaeDetector", "Surface normals (BAE), for normalbae ControlNets.",
    "Normal map: x, y, z of each surface's direction as red, green, blue.", {"filename": "scannet.pt"}))
MidasDepth = detector_node(Detector(
    "MidasDepth", "MidasDetector", "Depth from MiDaS (DPT-hybrid), as ControlNet's own depth annotator makes it.",
    "Depth map: near is bright.", {"filename": "dpt_hybrid-midas-501f0c75.pt"}))
ZoeDepth = detector_node(Detector(
    "ZoeDepth", "ZoeDetector", "Depth from ZoeDepth (metric depth), for depth ControlNets.",
    "Depth map: near is bright.", {"filename": "ZoeD_M12_N.pt"},
    (Option(_flag("gamma_corrected", "Apply gamma 2.2 to the depth values."), "gamma_corrected"),)))


class ContentShuffle(Node):
    """The image's content shuffled by a smooth random warp, for the shuffle ControlNet (style and colours without
    layout). controlnet_aux's ContentShuffleDetector, drawing from a generator of its own rather than numpy's global
    one, so runs on several threads at once cannot disturb each other's patterns."""

    category = "preprocess"
    disk_cache = True
    inputs = (
        _IMAGE, _DETECT_RESOLUTION, _IMAGE_RESOLUTION,
        Input("granularity", INT, "Size in pixels of the warp's random features; smaller shuffles finer.",
              default=256, min=8, max=4096),
        Input("seed", INT, "Seed of the random pattern; the same seed gives the same map, and every image of a batch "
              "gets the same pattern.", default=0, min=0, max=2**32 - 1),
    )
    outputs = (Output("image", IMAGE, "The warped image."),)

    def run(self, ctx: RunContext, image: torch.Tensor, detect_resolution: int, image_resolution: int,
            granularity: int, seed: int) -> dict[str, Any]:
        import numpy as np

        maps = [content_shuffle(item, detect_resolution, image_resolution, granularity, seed)
                for item in to_uint8(image)]
        return {"image": from_uint8(np.stack(maps), image.device)}


def content_shuffle(rgb: np.ndarray, detect_resolution: int, image_resolution: int, granularity: int,
                    seed: int) -> np.ndarray:
    """ContentShuffleDetector's map of one uint8 RGB image [H, W, 3], its noise drawn from `RandomState(seed)`:
    the MT19937 stream numpy's legacy global functions draw from after `np.random.seed(seed)`, so the maps equal
    controlnet_aux's seeded that way."""
    import cv2
    import numpy as np

    random = np.random.RandomState(seed)
    detected = _resize_sides_to_64(rgb, detect_resolution)
    rows, columns = detected.shape[:2]
    x = _noise_disk(random, rows, columns, granularity) * float(columns - 1)
    y = _noise_disk(random, rows, columns, granularity) * float(rows - 1)
    warped = cv2.remap(detected, np.concatenate([x, y], axis=2).astype(np.float32), None, cv2.INTER_LINEAR)
    out_rows, out_columns = _sides_at(rows, columns, image_resolution)
    return cv2.resize(warped, (out_columns, out_rows), interpolation=cv2.INTER_LINEAR)


def _sides_at(rows: int, columns: int, resolution: int) -> tuple[int, int]:
    """controlnet_aux's `resize_image` sizes: the short side at `resolution`, both rounded to multiples of 64."""
    import numpy as np

    scale = float(resolution) / min(rows, columns)
    return int(np.round(rows * scale / 64.0)) * 64, int(np.round(columns * scale / 64.0)) * 64


def _resize_sides_to_64(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """controlnet_aux's `resize_image`: Lanczos up, area down, to `_sides_at`."""
    import cv2

    rows, columns = _sides_at(*rgb.shape[:2], resolution)
    upscaling = float(resolution) / min(rgb.shape[:2]) > 1
    return cv2.resize(rgb, (columns, rows), interpolation=cv2.INTER_LANCZOS4 if upscaling else cv2.INTER_AREA)


def _noise_disk(random: np.random.RandomState, rows: int, columns: int, size: int) -> np.ndarray:
    """controlnet_aux's `make_noise_disk` with one channel: smooth noise in [0, 1], [rows, columns, 1]."""
    import cv2

    noise = random.uniform(low=0, high=1, size=((rows // size) + 2, (columns // size) + 2, 1))
    noise = cv2.resize(noise, (columns + 2 * size, rows + 2 * size), interpolation=cv2.INTER_CUBIC)
    noise = noise[size: size + rows, size: size + columns]
    noise -= noise.min()
    noise /= noise.max()
    return noise[:, :, None]


LineartStandard = detector_node(Detector(
    "LineartStandard", "LineartStandardDetector", "Line drawing from local darkness (a blur-difference filter, no "
    "model), for lineart ControlNets.", "White lines on black.",
    options=(Option(Input("gaussian_sigma", FLOAT, "Blur whose difference from the image marks lines; larger catches "
                          "broader strokes.", default=6.0, min=0.1, max=100.0), "guassian_sigma"),
             Option(Input("intensity_threshold", INT, "Darkness below which pixels do not set the line scale.",
                          default=8, min=0, max=255), "intensity_threshold")),
    image_resolution=False))

NODES = (HED, PidiNet, MLSD, OpenPose, Lineart, LineartAnime, NormalBae, MidasDepth, ZoeDepth, ContentShuffle,
         LineartStandard)
