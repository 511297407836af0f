"""What a running node may use besides its inputs: paths, progress, cancellation, the document."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphflow.events import CancelToken, EventHandler, FileWritten, NodeProgress
from graphflow.models.manager import ModelManager, shared_manager
from graphflow.paths import PathPolicy

if TYPE_CHECKING:
    from collections.abc import Mapping

    from graphflow.compiled import CompiledGraph


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
    file_bytes: dict[str, bytes] = field(default_factory=dict)  # file input name -> the bytes in the cache key
    graph: CompiledGraph | None = None  # what is running, for output nodes that record it (SaveImage)
    digests: Mapping[tuple[str, str], str] = field(default_factory=dict)  # (node, input) -> file digest or model key

    def progress(self, step: int, total: int) -> None:
        """Report step `step` of `total`, then stop here if the run was cancelled."""
        if self.on_event is not None:
            self.on_event(NodeProgress(self.node, self.type, step, total))
        self.cancel.check()

    def check_cancelled(self) -> None:
        self.cancel.check()

    def input_path(self, path: str, input: str = "path", *, directory: bool = False) -> Path:
        return self.paths.input_path(path, node=self.node, input=input, directory=directory)

    def read_file(self, path: str, input: str = "path") -> bytes:
        """The bytes of file input `input` (whose value is `path`): exactly the bytes the engine hashed into this
        node's cache key, so a file rewritten after planning can never be stored under the old key. Read from
        disk only when the node runs outside an engine."""
        data = self.file_bytes.get(input)
        return data if data is not None else self.input_path(path, input).read_bytes()

    def output_path(self, relative: str, input: str = "prefix") -> Path:
        return self.paths.output_path(relative, node=self.node, input=input)

    def wrote(self, path: Path) -> None:
        """Record a file this node wrote whole; call it once the file is in place, never for one still partial."""
        self.written.append(path)
        if self.on_event is not None:
            self.on_event(FileWritten(self.node, self.type, path))
