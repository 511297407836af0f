"""`graphflow serve --backend ray`: the service's workers are the Ray backend's actors (graphflow.ray_backend).

Each worker is a thread here that claims jobs from the queue as a local worker does (preferring jobs whose models
its actor holds) and runs each on its actor: the actor compiles and runs the job with its own Engine and warm
models, streams the job's events back (written to the queue as a local worker writes them), and returns the
results as PNG bytes and plain values, which the worker stores. Cancelling a job cancels it on the actor. An
actor that dies fails its running job with a message saying so; the worker claims the next job once Ray has
restarted the actor, and retires if Ray gives up on it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError

from graphflow.errors import GraphflowError
from graphflow.events import CancelToken
from graphflow.ray_actor import EngineSettings
from graphflow.ray_backend import _LOST, RayBackend, _cause, _Slot
from graphflow.service.config import ServiceConfig
from graphflow.service.queue import Job, JobQueue
from graphflow.service.results import ResultStore
from graphflow.service.worker import Worker, WorkerPool

_WAIT_S = 0.1
_RESTART_PATIENCE_S = 2.0  # how long one look waits for Ray to restart the actor (then stopping is checked)


class RayWorker(Worker):
    """A queue worker whose jobs run on one Ray actor; `engine` (here) only validates them."""

    def __init__(self, name: str, queue: JobQueue, store: ResultStore, engine: Any,
                 templates: Callable[[str], Path | None], slot: _Slot) -> None:
        super().__init__(name, queue, store, engine, templates, f"ray:{slot.index}")
        self.slot = slot

    def _loaded(self) -> set[str]:
        try:
            return set(RayBackend._ask(self.slot, "loaded", patience_s=10))
        except _LOST:
            return set()

    def ready(self) -> bool:
        """Claim only while the actor is up: a job waits in the queue while Ray restarts the actor (instead of
        failing on it), and a worker whose actor Ray gave up on retires."""
        try:
            RayBackend._ask(self.slot, "ready", patience_s=_RESTART_PATIENCE_S)
        except ActorDiedError:
            print(f"graphflow serve: {self.name}'s Ray actor died and Ray will not restart it; this worker "
                  "stops (the others go on)", file=sys.stderr, flush=True)
            self._stopping.set()
            return False
        except _LOST:  # still restarting: look again (unless the server stops)
            return False
        return True

    def execute(self, job: Job, source: Any, compiled: Any, types: dict[str, str],
                token: CancelToken) -> dict[str, Any]:
        record = self._recorder(job.id)
        stream = self.slot.actor.serve.options(num_returns="streaming").remote(
            str(source) if isinstance(source, Path) else source, job.params, job.options, types, job.id)
        cancelled = False
        try:
            while True:
                if token.cancelled and not cancelled:
                    self.slot.actor.cancel.remote(job.id)
                    cancelled = True
                if not ray.wait([stream], timeout=_WAIT_S)[0]:
                    continue
                kind, value = ray.get(next(stream))
                for event in value if kind == "events" else value[0]:
                    record(event)
                if kind == "done":
                    return value[1]  # type: ignore[no-any-return]
        except _LOST as error:
            raise GraphflowError(f"the Ray actor running the job died ({type(error).__name__}); Ray restarts it "
                                 "for the next job: submit this one again") from None
        except StopIteration:
            raise GraphflowError("the Ray actor ended the job without a result") from None
        except ray.exceptions.RayTaskError as error:
            raise _cause(error) from None


class RayWorkerPool(WorkerPool):
    """`config.ray_actors` Ray actors (default: one per GPU of the cluster) and a queue worker for each."""

    def __init__(self, config: ServiceConfig, queue: JobQueue, store: ResultStore,
                 templates: Callable[[str], Path | None], registry: Any) -> None:
        from graphflow.engine import Engine

        self.engine = Engine(registry, input_dirs=list(config.input_roots()), output_dir=config.outputs,
                             options=config.options)  # compiles (validates) jobs; runs nothing
        settings = EngineSettings(config.plugins, tuple(str(root) for root in config.input_roots()), None,
                                  config.cache_bytes, dict(config.options), str(config.outputs),
                                  config.model_memory_bytes, config.offload)
        self.backend = RayBackend(config.ray_address, actors=config.ray_actors,
                                  settings=settings)
        self.queue, self.store, self.templates = queue, store, templates
        self.workers: list[RayWorker] = []

    def start(self) -> None:
        """Start (or reach) the cluster and its actors, then a worker for each."""
        self.workers = [RayWorker(f"ray-{slot.index}", self.queue, self.store, self.engine, self.templates, slot)
                        for slot in self.backend.start()]
        super().start()

    def stop(self) -> None:
        super().stop()
        self.backend.close()
