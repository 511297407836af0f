"""Validation images during training, rendered by an ordinary graphflow graph from a checkpoint's ControlNet.

The graph is `VALIDATION_DOCUMENT` (LoadImage -> ControlApply -> Sampler -> VAEDecode -> SaveImage) or one of the
user's with some of the same params: `checkpoint`, `controlnet` (required), `control`, `prompt`, `seed`, `steps`,
`width`, `height`, `prefix`; the trainer fills those the graph declares. Its PNGs land under
OUT/validation/step-STEP/, each embedding the graph and params, so `graphflow run` can render it again.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphflow.atomic import atomic_write
from graphflow.document import load_document
from graphflow.errors import ValidationError
from graphflow.paths import PathPolicy
from graphflow.templates import parse_params
from graphflow.training.config import TrainConfig, TrainingError

if TYPE_CHECKING:
    from graphflow.training.dataset import TrainingSamples

VALIDATION_FOLDER = "validation"


def _param(type_name: str, description: str, **extra: Any) -> dict[str, Any]:
    return {"type": type_name, **extra, "description": description}


VALIDATION_DOCUMENT: dict[str, Any] = {
    "graphflow": 1,
    "name": "controlnet-validation",
    "description": "A control image -> the ControlNet being trained -> SD1.5 text-to-image -> PNG",
    "params": {
        "checkpoint": _param("STRING", "the base model the ControlNet is trained on"),
        "controlnet": _param("STRING", "the ControlNet folder, e.g. OUT/checkpoint-500/controlnet"),
        "control": _param("STRING", "the control image file"),
        "prompt": _param("STRING", "what to render", default=""),
        "seed": _param("INT", "noise seed", default=0),
        "steps": _param("INT", "denoising steps", default=20, min=1, max=1000),
        "width": _param("INT", "image width (a multiple of 8)", default=512, min=8),
        "height": _param("INT", "image height (a multiple of 8)", default=512, min=8),
        "prefix": _param("STRING", "output file name prefix", default="validation"),
    },
    "nodes": {
        "control_image": {"type": "LoadImage", "inputs": {"path": {"param": "control"}}},
        "sd": {"type": "CheckpointLoader", "inputs": {"model": {"param": "checkpoint"}}},
        "cn": {"type": "ControlNetLoader", "inputs": {"model": {"param": "controlnet"}}},
        "positive": {"type": "TextEncode", "inputs": {"clip": {"from": "sd.clip"}, "text": {"param": "prompt"}}},
        "control": {"type": "ControlApply",
                    "inputs": {"controlnet": {"from": "cn.controlnet"}, "image": {"from": "control_image.image"}}},
        "sample": {"type": "Sampler",
                   "inputs": {"model": {"from": "sd.model"}, "positive": {"from": "positive.conditioning"},
                              "control": [{"from": "control.control"}], "seed": {"param": "seed"},
                              "steps": {"param": "steps"}, "width": {"param": "width"},
                              "height": {"param": "height"}}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": {"from": "sd.vae"}, "latent": {"from": "sample.latent"}}},
        "save": {"type": "SaveImage", "inputs": {"image": {"from": "decode.image"}, "prefix": {"param": "prefix"}}},
    },
    "outputs": {"image": "decode.image"},
}


class ValidationRenderer:
    """Renders each validation (control image, prompt) pair through the validation graph with a checkpoint.

    Without validation images, the first training example is used: its control image as training sees it is
    written to OUT/validation/control-0.png, with its prompt unless prompts are given.
    """

    def __init__(self, config: TrainConfig, paths: PathPolicy, samples: TrainingSamples, device: str) -> None:
        from graphflow.engine import Engine
        from graphflow.models.manager import ModelManager

        self.config = config
        self.folder = paths.output_root / VALIDATION_FOLDER
        self.graph: Path | dict[str, Any] = VALIDATION_DOCUMENT
        if config.validation_graph is not None:
            self.graph = paths.input_path(str(config.validation_graph), input="validation_graph")
        self.declared = set(parse_params(load_document(self.graph) if isinstance(self.graph, Path) else self.graph)[0])
        if "controlnet" not in self.declared:
            raise TrainingError(f"the validation graph {self.graph} must declare a 'controlnet' param (the "
                                "checkpoint's ControlNet folder goes there)")
        self.pairs = self._pairs(paths, samples)
        # the output folder is an input root too: the checkpoints and control images written there are read back
        self.models = ModelManager()
        self.engine = Engine(input_dirs=[*paths.input_roots, paths.output_root], output_dir=self.folder,
                             models=self.models, options={"device": device})

    def _pairs(self, paths: PathPolicy, samples: TrainingSamples) -> list[tuple[Path, str]]:
        images = [paths.input_path(str(image), input="validation_images") for image in self.config.validation_images]
        prompts = list(self.config.validation_prompts)
        if not images:
            _, control = samples.example(0)
            path = self.folder / "control-0.png"
            atomic_write(path, _png(control))
            images, prompts = [path], prompts or [samples.triples[0].prompt]
        if len(images) == 1:
            images = images * max(1, len(prompts))
        if len(prompts) <= 1:
            prompts = (prompts or [""]) * len(images)
        return list(zip(images, prompts, strict=True))

    def render(self, step: int, controlnet: Path) -> list[Path]:
        """The PNGs of every validation pair rendered with the ControlNet folder `controlnet`. The models are
        let go afterwards: each checkpoint's ControlNet is another model, and renders are far apart."""
        try:
            return self._render(step, controlnet)
        finally:
            self.models.clear()

    def _render(self, step: int, controlnet: Path) -> list[Path]:
        files: list[Path] = []
        for index, (control, prompt) in enumerate(self.pairs):
            values = {"checkpoint": self.config.base_model, "controlnet": str(controlnet), "control": str(control),
                      "prompt": prompt, "seed": self.config.seed, "steps": self.config.validation_steps,
                      "width": self.config.resolution, "height": self.config.resolution,
                      "prefix": f"step-{step}/image-{index}"}
            try:
                result = self.engine.run(self.graph, {name: value for name, value in values.items()
                                                      if name in self.declared})
            except ValidationError as error:
                raise TrainingError(f"the validation graph cannot run: {error}") from error
            files.extend(result.files)
        return files


def _png(picture: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
