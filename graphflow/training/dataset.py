"""Training data for a ControlNet: (target image, control image, prompt) triples, read from a folder or a JSONL file.

A dataset folder:

    DATA/images/NAME.png          the target images (also .jpg, .jpeg, .webp, .bmp, .tif, .tiff)
    DATA/images/NAME.txt          the prompt of each target (UTF-8 text; may be empty)
    DATA/conditioning/NAME.png    the control image of each target, same NAME (any of the suffixes above)

A JSONL file holds one object per line with diffusers' column names, paths relative to the file's folder:

    {"image": "images/0.png", "conditioning_image": "conditioning/0.png", "text": "a red circle"}

With a control template (`ControlTemplate`), the control images are made from the targets by running a graphflow
template on each, so `conditioning/` and `conditioning_image` are not needed (and ignored). The template runs through
one Engine, so its results are cached like any node's: in memory, and on disk with a cache folder.

Every file must lie inside the run's input directories. Images are resized (short side to the resolution, bilinear)
and centre-cropped to a square; targets become [-1, 1], control images stay in [0, 1], as diffusers trains them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphflow.errors import ValidationError
from graphflow.paths import PathError, PathPolicy
from graphflow.training.config import TrainingError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from graphflow.compiled import CompiledGraph
    from graphflow.engine import Engine

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_SHOWN = 5  # names listed in an error about many files
# the modes whose convert("RGB") keeps every colour (16-bit grey and float pixels would be clipped to 0..255)
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "La"})


@dataclass(frozen=True)
class Triple:
    """One training example: the target image, its control image (None: made by the control template), the prompt."""

    target: Path
    control: Path | None
    prompt: str


def read_triples(data: Path, paths: PathPolicy, *, with_controls: bool = True) -> list[Triple]:
    """The triples of dataset folder or JSONL file `data`; `with_controls` False when a template makes the controls."""
    location = paths.input_path(str(data), input="data", directory=True)
    triples = _read_jsonl(location, paths, with_controls) if location.is_file() else \
        _read_folder(location, paths, with_controls)
    if not triples:
        raise TrainingError(f"the dataset {location} holds no examples")
    return triples


def _read_folder(folder: Path, paths: PathPolicy, with_controls: bool) -> list[Triple]:
    images = _images_in(folder / "images", folder)
    controls = _images_in(folder / "conditioning", folder) if with_controls else {}
    problems = []
    if with_controls:
        problems += _unmatched("targets without a control image in conditioning/", images.keys() - controls.keys())
        problems += _unmatched("control images without a target in images/", controls.keys() - images.keys())
    problems += _unmatched("targets without a prompt file images/NAME.txt",
                           {name for name in images if not (folder / "images" / f"{name}.txt").is_file()})
    if problems:
        raise TrainingError(f"the dataset folder {folder} has mismatched examples: {'; '.join(problems)}")
    return [Triple(paths.input_path(str(images[name]), input="data"),
                   paths.input_path(str(controls[name]), input="data") if with_controls else None,
                   _read_prompt(paths.input_path(str(folder / "images" / f"{name}.txt"), input="data")))
            for name in sorted(images)]


def _images_in(folder: Path, dataset: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise TrainingError(f"the dataset folder {dataset} has no {folder.name}/ folder; a dataset folder holds "
                            "images/NAME.png with a prompt in images/NAME.txt, and conditioning/NAME.png (or give a "
                            "JSONL file, or a control template to make the control images)")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in found:
            raise TrainingError(f"{folder} holds two images named {path.stem!r} ({found[path.stem].name}, "
                                f"{path.name}); each example needs one")
        found[path.stem] = path
    return found


def _unmatched(what: str, names: set[str]) -> list[str]:
    if not names:
        return []
    shown = sorted(names)[:_SHOWN]
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return [f"{len(names)} {what} ({', '.join(shown)}{more})"]


def _read_prompt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise TrainingError(f"cannot read the prompt {path}: {error}") from error


def _read_jsonl(file: Path, paths: PathPolicy, with_controls: bool) -> list[Triple]:
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise TrainingError(f"cannot read the dataset file {file}: {error}") from error
    columns = ("image", "conditioning_image", "text") if with_controls else ("image", "text")
    triples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _record(file, number, line, columns)
        where = f"{file} line {number}"
        target = _member(file, record["image"], paths, where)
        control = _member(file, record["conditioning_image"], paths, where) if with_controls else None
        triples.append(Triple(target, control, record["text"].strip()))
    return triples


def _record(file: Path, number: int, line: str, columns: tuple[str, ...]) -> dict[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise TrainingError(f"{file} line {number} is not JSON: {error}") from None
    if not isinstance(record, dict):
        raise TrainingError(f"{file} line {number} must be a JSON object with {', '.join(columns)}")
    missing = [column for column in columns if not isinstance(record.get(column), str)]
    if missing:
        raise TrainingError(f"{file} line {number} lacks {', '.join(missing)} (text values): each line holds "
                            f"{', '.join(repr(column) for column in columns)}, paths relative to {file.parent}")
    return record


def _member(file: Path, relative: str, paths: PathPolicy, where: str) -> Path:
    path = Path(relative) if Path(relative).is_absolute() else file.parent / relative
    try:  # the roots are checked before the file's existence, so nothing is learnt of files outside them
        return paths.input_path(str(path), input="data")
    except PathError as error:
        raise TrainingError(f"{where} names {relative!r}: {error}") from None


class ControlTemplate:
    """Makes each control image by running a template on the target: LoadImage(target) -> the template's IMAGE param;
    the result is the template's IMAGE output named `image` (or its only IMAGE output). Runs through `engine`, so
    a target seen again (the next epoch, the next run with a disk cache) comes from the cache."""

    def __init__(self, path: Path, params: Mapping[str, Any], engine: Engine) -> None:
        from graphflow.templates import Template
        from graphflow.types import IMAGE

        self.path = engine.paths.input_path(str(path), input="control_template")
        self.engine = engine
        self.params = dict(params)
        try:
            template = Template(self.path, engine.registry)
        except ValidationError as error:
            raise TrainingError(f"the control template {self.path} is not usable: {error}") from error
        image_params = [name for name, spec in template.params.items() if spec.type == IMAGE]
        if len(image_params) != 1:
            raise TrainingError(f"the control template {self.path} must have exactly one IMAGE param (the target "
                                f"goes there); it has {len(image_params)}: {', '.join(image_params) or 'none'}")
        self.image_param = image_params[0]
        outputs = [output.name for output in template.node_type.outputs if output.type == IMAGE]
        if "image" not in outputs and len(outputs) != 1:
            raise TrainingError(f"the control template {self.path} must have an IMAGE output named 'image' (or only "
                                f"one IMAGE output); it has {', '.join(outputs) or 'none'}")
        self.output = "image" if "image" in outputs else outputs[0]

    def document(self, target: Path) -> dict[str, Any]:
        """The graph that makes the control image of `target`."""
        inputs = {**self.params, self.image_param: {"from": "target.image"}}
        return {"graphflow": 1, "name": "training-control",
                "nodes": {"target": {"type": "LoadImage", "inputs": {"path": str(target)}},
                          "control": {"template": str(self.path), "inputs": inputs}},
                "outputs": {"control": f"control.{self.output}"}}

    def check(self, target: Path) -> CompiledGraph:
        """Validate the graph for `target` (the template's params and inputs), running nothing."""
        try:
            return self.engine.compile(self.document(target))
        except ValidationError as error:
            raise TrainingError(f"the control template {self.path} cannot run on {target}: {error}") from error

    def __call__(self, target: Path) -> Image.Image:
        from PIL import Image

        result = self.engine.run(self.check(target), outputs=["control"])
        pixels = result.outputs["control"][0].mul(255).round().clamp(0, 255).byte().numpy()
        return Image.fromarray(pixels)


@dataclass(frozen=True)
class Batch:
    """Targets [B, 3, R, R] in [-1, 1], control images [B, 3, R, R] in [0, 1], and the prompts."""

    targets: torch.Tensor
    controls: torch.Tensor
    prompts: list[str]


class TrainingSamples:
    """The examples of a dataset as square tensors of `resolution` pixels."""

    def __init__(self, triples: list[Triple], resolution: int, control_template: ControlTemplate | None = None) -> None:
        if control_template is None and any(triple.control is None for triple in triples):
            raise TrainingError("examples without control images need a control template to make them")
        self.triples = triples
        self.resolution = resolution
        self.control_template = control_template

    def __len__(self) -> int:
        return len(self.triples)

    def example(self, index: int) -> tuple[Image.Image, Image.Image]:
        """The target and control image of example `index`, resized and cropped as training sees them."""
        triple = self.triples[index]
        target = _open(triple.target)
        control = self.control_template(triple.target) if triple.control is None else _open(triple.control)
        _check_aspect(triple, target, control)
        return _fit(target, self.resolution), _fit(control, self.resolution)

    def batch(self, indices: list[int]) -> Batch:
        import numpy as np
        import torch

        def tensor(pictures: tuple[Image.Image, ...]) -> torch.Tensor:
            arrays = np.stack([np.asarray(picture, dtype=np.float32) / 255 for picture in pictures])
            return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()

        targets, controls = zip(*(self.example(index) for index in indices), strict=True)
        return Batch(tensor(targets) * 2 - 1, tensor(controls), [self.triples[index].prompt for index in indices])


def _open(path: Path) -> Image.Image:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            if picture.mode not in _EIGHT_BIT_MODES:  # Pillow's convert("RGB") would clip them, not scale them
                raise TrainingError(f"the image {path} has {picture.mode} pixels (16-bit or float); training reads "
                                    "8-bit images: save it as 8-bit RGB or grey")
            return ImageOps.exif_transpose(picture).convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise TrainingError(f"cannot read the image {path}: {error}") from error


def _check_aspect(triple: Triple, target: Image.Image, control: Image.Image) -> None:
    """A control image of another shape would be cropped differently and no longer line up with its target."""
    (width, height), (control_width, control_height) = target.size, control.size
    if abs(width * control_height - height * control_width) > 0.01 * width * control_height:
        raise TrainingError(f"the control image of {triple.target} is {control_width}x{control_height}, the target "
                            f"{width}x{height}: they must have the same aspect ratio to line up")


def _fit(picture: Image.Image, resolution: int) -> Image.Image:
    """Resize so the short side is `resolution` (bilinear), then crop the centre square."""
    from PIL import Image

    width, height = picture.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    resized = picture.resize(size, Image.Resampling.BILINEAR) if size != picture.size else picture
    left, top = round((size[0] - resolution) / 2), round((size[1] - resolution) / 2)
    return resized.crop((left, top, left + resolution, top + resolution))
