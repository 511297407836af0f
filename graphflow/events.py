"""What a run reports while it goes, and how a caller stops it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from graphflow.errors import Cancelled


@dataclass(frozen=True)
class RunStarted:
    """Sent once the plan is known: how many nodes will run and how many come from cache."""

    to_run: int
    cached: int


@dataclass(frozen=True)
class NodeStarted:
    node: str
    type: str


@dataclass(frozen=True)
class NodeCached:
    node: str
    type: str


@dataclass(frozen=True)
class NodeProgress:
    node: str
    type: str
    step: int
    total: int


@dataclass(frozen=True)
class NodeFinished:
    node: str
    type: str
    seconds: float


@dataclass(frozen=True)
class FileWritten:
    """An output node wrote a whole file (sent once the node's files are all in place)."""

    node: str
    type: str
    path: Path


@dataclass(frozen=True)
class NodeFailed:
    node: str
    type: str
    error: BaseException


Event = RunStarted | NodeStarted | NodeCached | NodeProgress | NodeFinished | FileWritten | NodeFailed
EventHandler = Callable[[Event], None]


class CancelToken:
    """Set from any thread to stop a run at the next node boundary or sampler step."""

    def __init__(self) -> None:
        self._cancelled = False  # one flag, written once: reading it needs no lock

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def check(self) -> None:
        if self._cancelled:
            raise Cancelled("the run was cancelled")
