"""Training: a custom ControlNet on a frozen base model (`train_controlnet`, `graphflow train-controlnet`).

The names below load on first use, so importing this package imports neither torch nor diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphflow.training.config import TrainConfig, TrainingError
    from graphflow.training.controlnet import StepReport, TrainResult, train_controlnet

_HOMES = {"TrainConfig": "config", "TrainingError": "config", "StepReport": "controlnet",
          "TrainResult": "controlnet", "train_controlnet": "controlnet"}
__all__ = ["StepReport", "TrainConfig", "TrainResult", "TrainingError", "train_controlnet"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'graphflow.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"graphflow.training.{home}"), name)
    globals()[name] = value
    return value
