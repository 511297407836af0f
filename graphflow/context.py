"""What a running node may use besides its inputs: paths, progress, cancellation, the document."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphflow.events import CancelToken, EventHandler, NodeProgress
from graphflow.models.manager import ModelManager, shared_manager
from graphflow.paths import PathPolicy


@dataclass(slots=True)
class RunContext:
    """Handed to `Node.run`; one per node execution."""

    node: str
    type: str
    paths: PathPolicy
    cancel: CancelToken
    document: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    on_event: EventHandler | None = None
    written: list[Path] = field(default_factory=list)
    models: ModelManager = field(default_factory=shared_manager)

    def progress(self, step: int, total: int) -> None:
        """Report step `step` of `total`, then stop here if the run was cancelled."""
        if self.on_event is not None:
            self.on_event(NodeProgress(self.node, self.type, step, total))
        self.cancel.check()

    def check_cancelled(self) -> None:
        self.cancel.check()

    def input_path(self, path: str, input: str = "path", *, directory: bool = False) -> Path:
        return self.paths.input_path(path, node=self.node, input=input, directory=directory)

    def output_path(self, relative: str, input: str = "prefix") -> Path:
        return self.paths.output_path(relative, node=self.node, input=input)

    def wrote(self, path: Path) -> None:
        self.written.append(path)
