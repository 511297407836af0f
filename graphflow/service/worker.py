"""Workers: one thread per device, each with its own Engine and ModelManager kept warm across jobs.

A worker claims the next job (preferring one whose models it already holds), runs it with the job's events
written to the queue, stops it at the next step when the job alone is cancelled, and stores its results.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphflow.errors import Cancelled, Code, GraphError, GraphflowError, NodeExecutionError, ValidationError
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
from graphflow.service.config import ServiceConfig
from graphflow.service.queue import CANCELLED, COMPLETED, FAILED, Job, JobQueue
from graphflow.service.results import ResultStore, portable_run

_CANCEL_POLL_S = 0.1  # how often a running job's cancel flag is read from the database
_IDLE_POLL_S = 0.5  # how often an idle worker looks for work when no submit wakes it


def job_source(job: Job, templates: Callable[[str], Path | None]) -> Any:
    """What the engine compiles for a job: the template's file (so templates it uses resolve beside it), else
    the inline document."""
    if job.template is not None:
        path = templates(job.template)
        if path is None:
            raise ValidationError([GraphError(Code.TEMPLATE_NOT_FOUND, "the template is no longer in the graphs "
                                              "folder (removed since the job was submitted)", input="template",
                                              expected="a template of GET /api/templates", found=job.template)])
        return path
    return job.document


def model_sources(compiled: Any) -> list[str]:
    """The model sources a compiled graph loads (its model inputs' literal values)."""
    sources = []
    for node in compiled.nodes.values():
        for spec in node.node_type.inputs:
            value = node.inputs.get(spec.name)
            if spec.model and isinstance(value, str):
                sources.append(value)
    return sorted(set(sources))


def error_json(error: BaseException) -> dict[str, Any]:
    """An error as the API reports it: a message and, for a validation error, every problem."""
    if isinstance(error, ValidationError):
        return {"message": str(error) or "the document is not valid", "errors": [e.to_json() for e in error.errors]}
    node = {"node": error.node, "type": error.node_type} if isinstance(error, NodeExecutionError) else {}
    return {"message": str(error), "errors": [], **node}


class Worker:
    """One thread running jobs from the queue on one Engine."""

    def __init__(self, name: str, queue: JobQueue, store: ResultStore, engine: Any,
                 templates: Callable[[str], Path | None], device: str) -> None:
        self.name = name
        self.device = device  # as ServiceConfig.worker_devices names it; the engine's options say the same
        self.queue = queue
        self.store = store
        self.engine = engine
        self.templates = templates
        self.wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"graphflow-{name}", daemon=True)
        self._token: CancelToken | None = None
        self._loaded_for: dict[str, set[str]] = {}  # a job's model source as written -> what the manager loaded

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current job (cancelled at its next step) and wait for the thread."""
        self._stopping.set()
        self.wake.set()
        if self._token is not None:
            self._token.cancel()
        self._thread.join(timeout)

    def ready(self) -> bool:
        """Whether to claim a job now (a Ray worker waits while its actor restarts): a local worker always is."""
        return True

    def held_models(self) -> set[str]:
        """The model sources, as jobs write them ("tiny:sd15", a hub id), whose models this worker still holds."""
        loaded = self._loaded()
        return {source for source, keys in self._loaded_for.items() if keys and keys <= loaded}

    def _loaded(self) -> set[str]:
        return {str(key) for key in self.engine.models.loaded()}

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if not self.ready():
                continue
            job = self.queue.claim(self.name, self.held_models(), device=self.device)
            if job is None:
                self.wake.wait(_IDLE_POLL_S)
                self.wake.clear()
                continue
            self.run_job(job)

    def run_job(self, job: Job) -> None:
        """Run one claimed job to its end: completed, failed or cancelled, with every event on the way."""
        token = self._token = CancelToken()
        done = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(job.id, token, done), daemon=True)
        watcher.start()
        before = self._loaded()
        try:
            source = job_source(job, self.templates)
            compiled = self.engine.compile(source, job.params)
            types = {name: compiled.nodes[link.node].node_type.output_map[link.output].type
                     for name, link in compiled.outputs.items()}
            portable = self.execute(job, source, compiled, types, token)
            summary = self.store.store_portable(portable)
            files = (self.store.summary(summary) or {}).get("files", [])
            self.queue.finish(job.id, COMPLETED, result=summary, data={"files": files, "seconds": portable["seconds"]})
        except Cancelled:
            if self._stopping.is_set() and not self.queue.cancel_requested(job.id):  # the server stops, not the user
                self.queue.finish(job.id, FAILED, error={"message": "the server was stopped while the job ran; "
                                                         "submit it again", "errors": []})
            else:
                self.queue.finish(job.id, CANCELLED, data={"while": "running"})
        except (GraphflowError, OSError) as error:
            status = CANCELLED if token.cancelled else FAILED
            self.queue.finish(job.id, status, error=None if status == CANCELLED else error_json(error))
        except Exception as error:  # a bug in a node or here: the job fails, the worker lives on
            traceback.print_exc()
            self.queue.finish(job.id, FAILED, error={"message": f"internal error: {error!r}", "errors": []})
        finally:
            done.set()
            self._token = None
            self._remember_loads(job, before)

    def execute(self, job: Job, source: Any, compiled: Any, types: dict[str, str],
                token: CancelToken) -> dict[str, Any]:
        """Run a compiled job on this worker's Engine; its result as graphflow.service.results.portable_run makes
        it (a Ray worker runs it on its actor instead: graphflow.service.ray_workers)."""
        result = self.engine.run(compiled, on_event=self._recorder(job.id), cancel=token, options=job.options)
        return portable_run(result, types)

    def _remember_loads(self, job: Job, before: set[str]) -> None:
        """Note which loaded models a job's sources became (known only when it names one, or nothing was loaded)."""
        new = self._loaded() - before
        if new and (len(job.models) == 1 or not before):
            for source in job.models:
                self._loaded_for[source] = new

    def _watch(self, job_id: str, token: CancelToken, done: threading.Event) -> None:
        while not done.wait(_CANCEL_POLL_S):
            if self.queue.cancel_requested(job_id):
                token.cancel()
                return

    def _recorder(self, job_id: str) -> Callable[[Event], None]:
        add = self.queue.add_event

        def record(event: Event) -> None:
            if isinstance(event, RunStarted):
                add(job_id, "run_started", {"to_run": event.to_run, "cached": event.cached})
            elif isinstance(event, NodeProgress):
                add(job_id, "node_progress", {"node": event.node, "type": event.type, "step": event.step,
                                              "total": event.total})
            elif isinstance(event, NodeFinished):
                add(job_id, "node_finished", {"node": event.node, "type": event.type, "seconds": event.seconds})
            elif isinstance(event, NodeFailed):
                add(job_id, "node_failed", {"node": event.node, "type": event.type, "error": str(event.error)})
            elif isinstance(event, FileWritten):
                add(job_id, "file_written", {"node": event.node, "type": event.type, "name": event.path.name,
                                             "path": output_place(event.path, self.engine.paths.output_root)
                                             or event.path.name})
            elif isinstance(event, (NodeStarted, NodeCached)):
                kind = "node_started" if isinstance(event, NodeStarted) else "node_cached"
                add(job_id, kind, {"node": event.node, "type": event.type})

        return record


def output_place(path: Path | str, root: Path) -> str | None:
    """A written file's path relative to the (resolved) output folder, in POSIX form: what ComfyUI's GET /view
    takes as subfolder and filename; None when it lies elsewhere."""
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except (ValueError, OSError):
        return None


class WorkerPool:
    """The service's workers, each with its own Engine and ModelManager, woken on submit."""

    def __init__(self, config: ServiceConfig, queue: JobQueue, store: ResultStore,
                 templates: Callable[[str], Path | None], registry: Any) -> None:
        from graphflow.engine import Engine
        from graphflow.models import ModelManager

        self.workers = []
        for index, device in enumerate(config.worker_devices()):
            models = ModelManager(config.model_memory_bytes, offload=config.offload)
            engine = Engine(registry, input_dirs=list(config.input_roots()), output_dir=config.outputs,
                            cache_bytes=config.cache_bytes, options={**config.options, "device": device}, models=models)
            self.workers.append(Worker(f"worker-{index}", queue, store, engine, templates, device))

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def notify(self) -> None:
        """Wake idle workers: a job was submitted."""
        for worker in self.workers:
            worker.wake.set()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
