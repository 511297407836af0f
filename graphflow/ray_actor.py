"""The Ray backend's actor (graphflow.ray_backend): one Engine and model manager per actor, warm across jobs.

The driver makes it with `ray.remote(EngineActor)`; here it is a plain class, importing neither Ray (but to name
its scratch folder) nor torch until an actor is built.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphflow.errors import GraphflowError
from graphflow.events import (
    CancelToken,
    Event,
    FileWritten,
    NodeCached,
    NodeFailed,
    NodeFinished,
    NodeProgress,
    NodeStarted,
    RunStarted,
)

# small and picklable: the driver's progress bar, the service's event log (NodeFailed too, its error made portable)
_FORWARDED = (RunStarted, NodeStarted, NodeCached, NodeProgress, NodeFinished, FileWritten)


@dataclass(frozen=True)
class EngineSettings:
    """What each actor builds its Engine from (the driver's engine, as plain data)."""

    plugins: tuple[str, ...] = ()
    input_dirs: tuple[str, ...] | None = None
    disk_cache: str | None = None
    cache_bytes: int = 2 << 30
    options: dict[str, Any] = field(default_factory=dict)
    output_dir: str | None = None  # where output nodes write (the service's outputs); None: a scratch folder
    model_memory_bytes: int | None = None
    offload: str = "none"

    @classmethod
    def of(cls, engine: Any, plugins: Sequence[str] = ()) -> EngineSettings:
        if engine is None:
            return cls(tuple(plugins))
        return cls(tuple(plugins), tuple(str(root) for root in engine.paths.input_roots),
                   None if engine.disk_cache is None else str(engine.disk_cache.directory),
                   engine.cache.max_bytes, dict(engine.options))


class EngineActor:
    """A Ray actor's state: one Engine, warm across jobs, writing into a scratch folder it empties after each job.

    Threaded (max_concurrency 2) so that `cancel` runs while `run` does."""

    def __init__(self, settings: EngineSettings, threads: int | None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        from graphflow.engine import Engine
        from graphflow.models import ModelManager

        self.scratch = _scratch_folder()
        try:
            self.engine = Engine(plugins=settings.plugins, input_dirs=list(settings.input_dirs or []) or None,
                                 output_dir=settings.output_dir or self.scratch, disk_cache=settings.disk_cache,
                                 cache_bytes=settings.cache_bytes, options=settings.options,
                                 models=ModelManager(settings.model_memory_bytes, offload=settings.offload))
        except BaseException:  # (a plugin it cannot import): the actor dies for good, nothing removes it later
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise
        self.tokens: dict[str, CancelToken] = {}  # the running job's, by the ticket the driver gave it

    def ready(self) -> int:
        return os.getpid()

    def cancel(self, ticket: str) -> None:
        """Cancel the job handed out with `ticket`, if it still runs here (a late call never stops the next job)."""
        token = self.tokens.get(ticket)
        if token is not None:
            token.cancel()

    def loads(self) -> dict[str, int]:
        """How many times each model was loaded by this actor (since it last started)."""
        return {str(key): count for key, count in self.engine.models.loads.items()}

    def loaded(self) -> list[str]:
        """The models this actor holds now."""
        return [str(key) for key in self.engine.models.loaded()]

    def serve(self, source: Any, params: dict[str, Any], options: dict[str, Any], types: dict[str, str],
              ticket: str) -> Iterator[tuple[str, Any]]:
        """Run one `graphflow serve` job (a template's path or a document): its events, then ("done", what
        graphflow.service.results.portable_run makes of the result)."""
        from graphflow.service.results import portable_run

        def run(send: Any, token: CancelToken) -> dict[str, Any]:
            result = self.engine.run(source, params, on_event=lambda event: _forward(event, send), cancel=token,
                                     options=options)
            return portable_run(result, types)

        yield from self._stream(run, ticket)

    def shutdown(self) -> None:
        """Remove the scratch folder (before the driver kills this actor)."""
        shutil.rmtree(self.scratch, ignore_errors=True)

    def run(self, template: str, params: dict[str, Any], options: dict[str, Any],
            ticket: str) -> Iterator[tuple[str, Any]]:
        """Run one sweep job: its events while it runs, then its summary with its files as bytes (see _stream)."""
        try:
            yield from self._stream(lambda send, token: self._run(template, params, options, token, send), ticket)
        except BaseException:
            _empty(self.scratch)  # a failed job's partial output is not the next job's
            raise

    def _stream(self, work: Any, ticket: str) -> Iterator[tuple[str, Any]]:
        """Call `work(send, token)` on a thread of this actor; yield ("events", [the events it sent since the last
        item]) while it runs, then ("done", (the last events, what it returned)), or raise what it raised. The
        engine calls back on its own thread: a queue turns the callbacks into this stream, a batch per item (each
        item costs a round trip; a quick job is one item)."""
        import queue
        import threading

        token = self.tokens[ticket] = CancelToken()
        inbox: queue.Queue[Event | None] = queue.Queue()
        outcome: dict[str, Any] = {}

        def call() -> None:
            try:
                outcome["result"] = work(inbox.put, token)
            except BaseException as error:  # raised below, in the actor's call, so the driver sees it
                outcome["error"] = error
            finally:
                inbox.put(None)

        thread = threading.Thread(target=call, name="graphflow-ray-job", daemon=True)
        thread.start()
        batch: list[Event | None] = []
        try:
            while True:
                batch.append(inbox.get())  # waits for the first; then takes what else came meanwhile
                with contextlib.suppress(queue.Empty):
                    while True:
                        batch.append(inbox.get_nowait())
                if batch[-1] is None:  # the end mark, always put last
                    batch.pop()
                    break
                yield ("events", batch)
                batch = []
        finally:
            if thread.is_alive():  # the driver stopped listening (the stream was dropped): stop the job too
                token.cancel()
            thread.join()
            self.tokens.pop(ticket, None)
        if "error" in outcome:
            if batch:  # what ran up to the failure (and NodeFailed), as a local run reports it before raising
                yield ("events", batch)
            raise outcome["error"]
        yield ("done", (batch, outcome["result"]))

    def _run(self, template: str, params: dict[str, Any], options: dict[str, Any], token: CancelToken,
             send: Any) -> dict[str, Any]:
        from graphflow.sweep_runner import image_files

        engine = self.engine
        result = engine.run(template, params, on_event=lambda event: _forward(event, send), cancel=token,
                            options=options)
        if engine.compile(template, params).output_nodes():
            files = []
            for path in result.files:
                name = path.relative_to(self.scratch).as_posix() if path.is_relative_to(self.scratch) else path.name
                files.append((name, path.read_bytes()))
            _empty(self.scratch)  # the next job's SaveImage counts from 00000 again, as a local sweep's does
        else:
            files = image_files(result, params)
        return {"files": files, "ran": result.ran, "cached": result.cached, "seconds": result.seconds}


def _scratch_folder() -> Path:
    """This actor's scratch folder, named by its Ray actor id, which a restart keeps: the restarted actor empties
    what its killed predecessor left there (a job's partial files) instead of leaving a new folder per restart."""
    with contextlib.suppress(Exception):
        # (outside an actor: no id; and get_runtime_context() would start a Ray instance where none runs)
        import ray

        actor_id = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
        if not actor_id:
            raise LookupError("not in a Ray actor")
        folder = Path(tempfile.gettempdir()) / f"graphflow-ray-{actor_id}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o700)  # not there any more: ours alone
        return folder
    return Path(tempfile.mkdtemp(prefix="graphflow-ray-"))  # outside an actor, or the folder could not be made


def _forward(event: Event, send: Any) -> None:
    if isinstance(event, _FORWARDED):
        send(event)
    elif isinstance(event, NodeFailed):  # the service's log and ComfyUI's execution_error name the failed node
        send(NodeFailed(event.node, event.type, _portable(event.error)))


def _portable(error: BaseException) -> BaseException:
    """An error as it can cross to the driver: itself when it pickles, else a GraphflowError with its text."""
    import pickle

    try:
        pickle.dumps(error)
    except Exception:
        return GraphflowError(f"{type(error).__name__}: {error}")
    return error


def _empty(root: Path) -> None:
    """Remove everything under `root`, keeping `root`."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
