"""Training checkpoints, written whole or not at all, and read back to resume; nothing is ever unpickled.

    OUT/checkpoint-STEP/controlnet/            the ControlNet so far (save_pretrained: config.json + safetensors)
    OUT/checkpoint-STEP/optimizer.safetensors  the optimizer's tensors (AdamW moments and step counts)
    OUT/checkpoint-STEP/training_state.json    step, losses so far, optimizer settings, loss scaler, the config
    OUT/controlnet/                            the final ControlNet, loadable by ControlNetLoader

Each folder is written under a temporary name beside its target (`.NAME.XXXXXXXX.tmp`), synced, then renamed into
place, so a killed run leaves complete checkpoints and temporary folders, which the next run removes. One run at a
time may write into an output folder (`OutputLock`). Samples, noise and timesteps derive from the seed and the step,
so the seed is all the random state a resumed run needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphflow.training.config import TrainingError

if TYPE_CHECKING:
    import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so nothing stops two runs sharing a folder there
    fcntl = None  # type: ignore[assignment]

CONTROLNET = "controlnet"
STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT = 1
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_STAGING = re.compile(r"\.(checkpoint-\d+|controlnet)\..+\.tmp")
_LOCK_FILE = ".train-controlnet.lock"
_MOMENTS = ("step", "exp_avg", "exp_avg_sq")  # what AdamW keeps per parameter


@dataclass(frozen=True)
class TrainingState:
    """What a checkpoint records besides the weights: enough to continue exactly where it stopped."""

    step: int
    losses: list[float]
    fixed: dict[str, Any]  # TrainConfig.fixed_for_resume() of the run that wrote it
    optimizer: dict[str, Any]  # the optimizer's state_dict without its tensors
    scaler: dict[str, Any] | None  # the fp16 loss scaler's state, if there is one
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "step": self.step, "losses": self.losses, "fixed": self.fixed,
                "optimizer": self.optimizer, "scaler": self.scaler, "config": self.config}


class OutputLock:
    """Held while a run writes into `folder`: a second run into the same folder is refused, not interleaved."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        try:  # never through a symlink: O_CREAT would make the file it points to, wherever that is
            self._handle = os.open(folder / _LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as error:
            raise TrainingError(f"cannot lock the output folder {folder}: {folder / _LOCK_FILE} cannot be opened "
                                f"({error.strerror or error}); remove it if it is a symlink") from None
        if fcntl is None:
            return
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._handle)
            raise TrainingError(f"another training run is writing into {folder}; wait for it or choose another "
                                "output folder") from None
        for entry in folder.iterdir():  # left by a run that was killed while writing a checkpoint
            if _STAGING.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)

    def release(self) -> None:
        if self._handle >= 0:
            os.close(self._handle)
            self._handle = -1


def checkpoints(folder: Path) -> dict[int, Path]:
    """The complete checkpoints in `folder` by step."""
    if not folder.is_dir():
        return {}
    found = {int(match[1]): entry for entry in folder.iterdir()
             if (match := _CHECKPOINT.fullmatch(entry.name)) and (entry / STATE_FILE).is_file()}
    return dict(sorted(found.items()))


def files_outside(checkpoint: Path, roots: tuple[Path, ...]) -> list[Path]:
    """The paths of `checkpoint` a resumed run reads that lead outside `roots` (through a symlink, say)."""
    controlnet = checkpoint / CONTROLNET
    paths = [checkpoint, checkpoint / STATE_FILE, checkpoint / OPTIMIZER_FILE, controlnet,
             *(sorted(controlnet.iterdir()) if controlnet.is_dir() else ())]

    def inside(path: Path) -> bool:
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
            return False
        return any(resolved.is_relative_to(root) for root in roots)

    return [path for path in paths if not inside(path)]


def write_directory(parent: Path, name: str, write: Callable[[Path], None]) -> Path:
    """`parent/name` filled by `write(folder)` in a temporary folder, synced and renamed into place (replacing a
    folder of that name)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    target = parent / name
    try:
        write(staging)
        _sync_tree(staging)
        if target.exists():
            replaced = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
            os.replace(target, replaced / name)
            os.replace(staging, target)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(staging, target)
        _sync(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _sync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders holding them
        _sync(path)
    _sync(folder)


def _sync(path: Path) -> None:
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on Windows; its rename is what matters there
        return
    try:
        with contextlib.suppress(OSError):  # some file systems cannot sync folders
            os.fsync(handle)
    finally:
        os.close(handle)


def save_checkpoint(out: Path, step: int, controlnet: Any, optimizer: Any, state: TrainingState,
                    keep: int | None) -> Path:
    """Write OUT/checkpoint-STEP (see the module docstring); then keep only the `keep` latest, if set."""
    from safetensors.torch import save_file

    tensors, plain = _split_optimizer_state(optimizer.state_dict())
    record = dataclasses.replace(state, optimizer=plain)

    def write(folder: Path) -> None:
        controlnet.save_pretrained(folder / CONTROLNET, safe_serialization=True)
        save_file(tensors, str(folder / OPTIMIZER_FILE))
        (folder / STATE_FILE).write_text(json.dumps(record.to_json(), indent=2) + "\n", encoding="utf-8")

    path = write_directory(out, f"checkpoint-{step}", write)
    if keep is not None:
        for old in list(checkpoints(out).values())[:-keep]:
            # out of sight first: a run killed while deleting must not leave a half checkpoint that looks whole
            doomed = Path(tempfile.mkdtemp(prefix=f".{old.name}.", suffix=".tmp", dir=out))
            with contextlib.suppress(OSError):
                os.replace(old, doomed / old.name)
            shutil.rmtree(doomed, ignore_errors=True)
    return path


def read_state(checkpoint: Path) -> TrainingState:
    """The training state a checkpoint folder records; TrainingError when it is missing or not graphflow's."""
    path = checkpoint / STATE_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainingError(f"{checkpoint} is not a training checkpoint: cannot read {STATE_FILE} ({error})") from None
    fields = ("step", "losses", "fixed", "optimizer", "scaler", "config")
    if not isinstance(record, dict) or record.get("format") != FORMAT or any(key not in record for key in fields):
        raise TrainingError(f"{path} is not a graphflow training state of format {FORMAT}")
    problems = _state_problems(record)
    if problems:
        raise TrainingError(f"{path} is not a usable training state: {'; '.join(problems)}")
    return TrainingState(*(record[key] for key in fields))


def _state_problems(record: dict[str, Any]) -> list[str]:
    """What is wrong with the fields of a training state read from JSON (a crafted or damaged file)."""
    step, losses, optimizer, scaler = record["step"], record["losses"], record["optimizer"], record["scaler"]
    problems = []
    step_ok = isinstance(step, int) and not isinstance(step, bool) and step >= 1
    if not step_ok:
        problems.append(f"step must be a whole number of at least 1, found {_shown(step)}")
    if not (isinstance(losses, list) and all(map(_finite, losses)) and (not step_ok or len(losses) == step)):
        problems.append(f"losses must be a list of one finite number per step, found {_shown(losses)}")
    problems += [f"{name} must be an object, found {_shown(record[name])}" for name in ("fixed", "config")
                 if not isinstance(record[name], dict)]
    entries = optimizer.get("state") if isinstance(optimizer, dict) else None
    if not (isinstance(entries, dict) and all(index.isdecimal() and isinstance(entry, dict)
                                              for index, entry in entries.items())):
        problems.append(f"optimizer must be an object whose state maps parameter numbers to objects, found "
                        f"{_shown(optimizer)}")
    if not (scaler is None or (isinstance(scaler, dict) and all(map(_finite, scaler.values())))):
        problems.append(f"scaler must be null or an object of numbers, found {_shown(scaler)}")
    return problems


def _finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def load_optimizer_state(checkpoint: Path, state: TrainingState, optimizer: Any) -> dict[str, Any]:
    """The state_dict for `optimizer` with the moments saved in `checkpoint` (tensors on the CPU); its settings
    (param_groups) stay `optimizer`'s own, so a checkpoint cannot switch on amsgrad or maximize."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = checkpoint / OPTIMIZER_FILE
    try:
        tensors = load_file(str(file))
    except (OSError, SafetensorError) as error:
        raise TrainingError(f"cannot read the optimizer state {file}: {error}") from None
    values: dict[int, dict[str, Any]] = {int(index): dict(entry) for index, entry in state.optimizer["state"].items()}
    for name, tensor in tensors.items():
        index, _, key = name.partition(".")
        if not index.isdecimal() or not key:
            raise TrainingError(f"the optimizer state {file} holds a tensor named {name!r}; expected PARAM.KEY")
        values.setdefault(int(index), {})[key] = tensor
    current = optimizer.state_dict()
    shapes = {index: parameter.shape for saved, group in zip(current["param_groups"], optimizer.param_groups,
                                                              strict=True)
              for index, parameter in zip(saved["params"], group["params"], strict=True)}
    for index, entry in values.items():
        problem = _moment_problem(entry, shapes.get(index))
        if problem:
            raise TrainingError(f"the optimizer state {file} does not fit this ControlNet: parameter {index} {problem}")
    return {"state": values, "param_groups": current["param_groups"]}


def _moment_problem(entry: dict[str, Any], shape: Any) -> str | None:
    """What is wrong with one parameter's AdamW state (step, exp_avg, exp_avg_sq), or None."""
    import torch

    if shape is None:
        return "does not exist"
    if set(entry) != set(_MOMENTS):
        return f"has {', '.join(sorted(entry)) or 'nothing'}; expected {', '.join(_MOMENTS)}"
    for key in _MOMENTS:
        value = entry[key]
        expected = torch.Size([]) if key == "step" else shape
        found = value.shape if isinstance(value, torch.Tensor) else None
        if found != expected or not value.is_floating_point():
            return f"{key} is {_described(value)}; expected a float tensor of shape {list(expected)}"
    return None


def _described(value: Any) -> str:
    import torch

    return f"a {value.dtype} tensor of shape {list(value.shape)}" if isinstance(value, torch.Tensor) else \
        f"{type(value).__name__} {value!r}"


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors named "PARAM.KEY", the rest as JSON values) of an optimizer state_dict."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"state": plain, "param_groups": state_dict["param_groups"]}
