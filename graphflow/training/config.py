"""What a ControlNet training run is asked to do: `TrainConfig`, checked before anything loads.

No torch here: a config can be built, checked and printed without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from graphflow.errors import GraphflowError
from graphflow.paths import PathPolicy

MixedPrecision = Literal["no", "fp16", "bf16"]
MIXED_PRECISION = ("no", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
# the fields that fix which samples, noise and timesteps each step sees: a resumed run must keep them
RESUME_FIXED = ("base_model", "seed", "batch_size", "gradient_accumulation_steps", "resolution")


class TrainingError(GraphflowError):
    """A training run cannot start or continue: a bad setting, dataset, base model or checkpoint."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of `train_controlnet`; paths are relative to the current directory.

    `data` is a dataset folder or JSONL file (graphflow.training.dataset). `control_template` makes the control
    images from the targets instead of reading them: a graph document with one IMAGE param and an IMAGE output,
    given `control_params` as its other inputs. Every file read (data, base model, templates, validation images)
    must lie inside `input_dirs`.
    """

    base_model: str
    data: Path
    out: Path
    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    resolution: int = 512
    seed: int = 0
    mixed_precision: MixedPrecision = "no"
    device: str = "auto"
    conditioning_channels: tuple[int, ...] | None = None  # ControlNet's control-image encoder; None: diffusers'
    control_template: Path | None = None
    control_params: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int = 500
    keep_checkpoints: int | None = None
    resume: bool | Path = False
    validate_every: int = 0
    validation_images: tuple[Path, ...] = ()
    validation_prompts: tuple[str, ...] = ()
    validation_graph: Path | None = None
    validation_steps: int = 20
    input_dirs: tuple[Path, ...] = ()
    cache_dir: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("data", "out", "control_template", "validation_graph", "cache_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "input_dirs", tuple(Path(folder) for folder in self.input_dirs))
        object.__setattr__(self, "validation_images", tuple(Path(image) for image in self.validation_images))
        object.__setattr__(self, "validation_prompts", tuple(self.validation_prompts))
        if isinstance(self.resume, str):
            object.__setattr__(self, "resume", Path(self.resume))

    def check(self) -> None:
        """Raise TrainingError listing every setting that cannot work."""
        problems = [problem for problem in (*self._range_problems(), *self._choice_problems()) if problem]
        if problems:
            raise TrainingError("train-controlnet settings: " + "; ".join(problems))

    def _range_problems(self) -> list[str | None]:
        def at_least(name: str, low: float) -> str | None:
            value = getattr(self, name)
            return None if value >= low else f"{name} must be at least {low}, found {value}"

        lowest = {"steps": 1, "seed": 0, "batch_size": 1, "gradient_accumulation_steps": 1, "warmup_steps": 0,
                  "checkpoint_every": 0, "validate_every": 0, "validation_steps": 1, "max_grad_norm": 0,
                  "adam_epsilon": 0}
        return [
            *(at_least(name, low) for name, low in lowest.items()),
            None if self.learning_rate > 0 else f"learning_rate must be positive, found {self.learning_rate}",
            None if self.resolution >= 8 and self.resolution % 8 == 0 else
            f"resolution must be a positive multiple of 8 (latents are 1/8 of the image), found {self.resolution}",
            None if self.keep_checkpoints is None or self.keep_checkpoints >= 1 else
            f"keep_checkpoints must be at least 1 (or unset to keep all), found {self.keep_checkpoints}",
        ]

    def _choice_problems(self) -> list[str | None]:
        images, prompts = len(self.validation_images), len(self.validation_prompts)
        return [
            None if self.mixed_precision in MIXED_PRECISION else
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, found {self.mixed_precision!r}",
            None if self.device in DEVICES else f"device must be one of {', '.join(DEVICES)}, found {self.device!r}",
            None if self.mixed_precision != "fp16" or self.device != "cpu" else
            "mixed_precision fp16 needs a CUDA GPU; on the CPU use bf16 or no",
            None if images == prompts or images <= 1 or prompts <= 1 else
            f"give as many validation prompts as validation images (or one of either), found {prompts} prompts "
            f"for {images} images",
            None if not self.control_params or self.control_template is not None else
            "control_params are inputs of control_template, which is not set",
        ]

    def path_policy(self) -> PathPolicy:
        """Where files may be read from (`input_dirs`, default the current directory) and written (`out`)."""
        return PathPolicy.create(list(self.input_dirs) or None, self.out)

    def fixed_for_resume(self) -> dict[str, Any]:
        """The settings a checkpoint records and a resumed run must share, as JSON values."""
        return {name: getattr(self, name) for name in RESUME_FIXED}

    def to_json(self) -> dict[str, Any]:
        """Every setting as JSON values (paths as text), for the checkpoint's record of how it was made."""
        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, (tuple, list)):
                return [plain(item) for item in value]
            if isinstance(value, dict):
                return {key: plain(item) for key, item in value.items()}
            return value

        return {item.name: plain(getattr(self, item.name)) for item in dataclasses.fields(self)}
