"""The Ray backend of `graphflow sweep` (and of `graphflow serve --backend ray`): the graphflow[ray] extra.

One actor per GPU of the cluster (`num_gpus=1`; on a CPU-only cluster one per `threads` CPUs, with torch set to
that many threads), each holding an Engine and a ModelManager that stay warm across jobs and sweeps. The driver
hands each idle actor the pending job it is best placed for: one whose models it already holds (then the most of
them), then the one sharing most node keys with what it ran (cached prompt encodings, edge maps), then the one
with most models no other actor holds, then the lowest index; an actor warm with other models leaves the last
few jobs of models another actor holds to that actor. An actor streams its job's events (the driver's progress
bar) and then the job's files as bytes — PNGs, never tensors through the object store — which the driver writes
into the job's folder, once. An actor that dies is restarted by Ray, and its unfinished job is handed out again:
results are content-addressed, so a retried job writes exactly what the first try would have, and nothing twice.

Nothing in graphflow imports this module except `graphflow.sweep_runner.make_backend`; it imports Ray.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from graphflow.atomic import atomic_write
from graphflow.errors import Cancelled, GraphflowError
from graphflow.events import CancelToken
from graphflow.ray_actor import EngineActor, EngineSettings
from graphflow.sweep_runner import BackendUnavailable, Job, JobEventHandler, JobFailed, JobRecord

MAX_TRIES = 3  # a job whose actor dies this many times fails the sweep (a job that kills every actor it touches)
_WAIT_S = 0.2  # how long the driver waits for actors before looking at its cancel token again
_STOP_S = 10.0  # how long a stopped sweep waits for its cancelled jobs to end before restarting their actors
_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)


@dataclass
class _Slot:
    """The driver's view of one actor: its handle, what it has run (for routing) and its running job."""

    index: int
    actor: Any
    models: set[str] = field(default_factory=set)
    keys: set[str] = field(default_factory=set)
    job: Any = None
    stream: Any = None
    ticket: str = ""  # names the running job to the actor's `cancel`
    revive: Any = None  # after its actor died: the call that answers once Ray has restarted it
    dead: bool = False  # Ray gave up restarting it

    @property
    def idle(self) -> bool:
        return self.job is None and self.revive is None and not self.dead


class RayBackend:
    """Sweeps on a Ray cluster: `address` of a running one (as `ray start --head` prints), else a local one.

    `actors`: how many (default: one per GPU; on a CPU-only cluster its CPUs // `threads`); `threads`: torch
    threads per CPU actor (default 1). Actors stay alive across sweeps until `close()`. `init`: more ray.init
    arguments; `settings`: the actors' Engine settings, instead of `engine`'s and `plugins`."""

    def __init__(self, address: str | None = None, *, actors: int | None = None, threads: int | None = None,
                 engine: Any = None, plugins: Sequence[str] = (), options: Mapping[str, Any] | None = None,
                 init: Mapping[str, Any] | None = None, settings: EngineSettings | None = None) -> None:
        self.address = address
        self.actors_wanted = actors
        self.threads = threads
        self.settings = settings if settings is not None else EngineSettings.of(engine, plugins)
        self.options = dict(options or {})
        self.init_options = dict(init or {})
        self.driver_engine = engine
        self.slots: list[_Slot] = []
        self.restarts = 0  # jobs handed out again because their actor died
        self._started_ray = False

    # -- the cluster and the actors --------------------------------------------------------------------------

    def start(self) -> list[_Slot]:
        """Connect (or start a local cluster) and make the actors, once; their slots."""
        if self.slots:
            return self.slots
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            try:
                if self.address is None:  # a cluster of this machine alone: nothing listens beyond it
                    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                             log_to_driver=False, **self.init_options)
                else:
                    ray.init(address=self.address, log_to_driver=False, **self.init_options)
            except Exception as error:  # Ray raises ConnectionError, RuntimeError, ValueError ... for these
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray cluster"
                raise BackendUnavailable(f"cannot start or reach {where}: {error}") from error
            self._started_ray = True
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        threads = self.threads or 1
        count = self.actors_wanted or (gpus if gpus else max(1, int(resources.get("CPU", 1)) // threads))
        _check_room(count, gpus, threads, resources)
        actor_class = ray.remote(EngineActor).options(
            num_gpus=1 if gpus else 0, num_cpus=0 if gpus else threads, max_concurrency=2, max_restarts=-1,
            max_task_retries=0)
        actors = [actor_class.remote(self.settings, None if gpus and not self.threads else threads)
                  for _ in range(count)]
        try:
            ray.get([actor.ready.remote() for actor in actors])
        except RayActorError as error:  # an actor's __init__ raised (a --plugin the cluster cannot import, say)
            for actor in actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            if not getattr(error, "actor_init_failed", False):
                raise
            raise GraphflowError(f"the Ray actors could not start: {_last_line(str(error))} (graphflow and every "
                                 "--plugin must be importable on each machine of the cluster)") from None
        self.slots = [_Slot(index, actor) for index, actor in enumerate(actors)]
        return self.slots

    def actor_pids(self) -> list[int]:
        """The process id of each actor (as now: an actor restarted by Ray has a new one)."""
        return [self._ask(slot, "ready") for slot in self.slots]

    def model_loads(self) -> list[dict[str, int]]:
        """Per actor, how many times it loaded each model since it (last) started."""
        return [self._ask(slot, "loads") for slot in self.slots]

    @staticmethod
    def _ask(slot: _Slot, method: str, patience_s: float = 60.0) -> Any:
        """An actor's answer, waiting while Ray restarts it."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                return ray.get(getattr(slot.actor, method).remote())
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(_WAIT_S)

    def close(self) -> None:
        """Kill the actors; shut Ray down when this backend started it."""
        for slot in self.slots:
            with contextlib.suppress(Exception):
                ray.get(slot.actor.shutdown.remote(), timeout=5)
            with contextlib.suppress(Exception):
                ray.kill(slot.actor)
        self.slots = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    # -- a sweep -----------------------------------------------------------------------------------------------

    def run(self, template: Path, jobs: Sequence[Job], out: Path, *, on_event: JobEventHandler | None,
            cancel: CancelToken) -> Iterator[JobRecord]:
        slots = self.start()
        routes = {job.index: self._route(template, job) for job in jobs}
        pending = list(jobs)
        tries = dict.fromkeys(routes, 0)
        try:
            while pending or any(slot.job is not None for slot in slots):
                cancel.check()
                for slot in slots:
                    if slot.idle and pending:
                        job = self._pick(pending, slot, slots, routes)
                        if job is not None:
                            pending.remove(job)
                            self._hand(slot, job, str(template), routes[job.index])
                if pending and all(slot.dead for slot in slots):
                    raise JobFailed("every Ray actor of the sweep died and Ray could not restart them; "
                                    "the actors' logs (ray logs) say why")
                waiting = {slot.stream: slot for slot in slots if slot.job is not None}
                waiting.update({slot.revive: slot for slot in slots if slot.revive is not None})
                ready, _ = ray.wait(list(waiting), num_returns=1, timeout=_WAIT_S)
                for ref in ready:
                    slot = waiting[ref]
                    if ref is slot.revive:
                        self._revived(slot)
                        continue
                    job = slot.job
                    try:
                        kind, value = ray.get(next(ref))
                    except (StopIteration, *_LOST):  # (a stream ends only after "done")
                        kind, value = "lost", None
                    except RayTaskError as error:
                        slot.job = slot.stream = None
                        raise _cause(error) from None
                    if kind in ("events", "done") and on_event is not None:
                        for event in value if kind == "events" else value[0]:
                            on_event(job, event)
                    if kind == "events":
                        continue
                    slot.job = slot.stream = None
                    if kind == "done":
                        yield _record(job, value[1], out)
                        continue
                    self._lost(slot)
                    tries[job.index] += 1
                    if tries[job.index] >= MAX_TRIES:
                        raise JobFailed(f"job {job.index} ({job.folder}) lost its Ray actor {MAX_TRIES} "
                                        "times; the actor's log (ray logs) says why")
                    pending.insert(0, job)
        finally:
            self._stop_running(slots)

    def _route(self, template: Path, job: Job) -> tuple[frozenset[str], frozenset[str]]:
        """The job's model keys (its loaders') and all its node keys, as the driver plans them (a model the driver
        does not have, on the cluster's machines only, is keyed by its source as written)."""
        from graphflow.engine import Engine
        from graphflow.execution import node_traits
        from graphflow.planning import plan_run

        engine = self.driver_engine if self.driver_engine is not None else Engine(plugins=self.settings.plugins)
        compiled = engine.compile(template, job.params)
        options = {"compile": engine.models.compile, **engine.options, **self.options}
        keyed = plan_run(compiled, list(compiled.nodes), options, engine.paths)
        models = frozenset(key for node_id, key in keyed.keys.items()
                           if node_traits(compiled.nodes[node_id].node_type).reads_models)
        return models, frozenset(keyed.keys.values())

    @staticmethod
    def _pick(pending: list[Job], slot: _Slot, slots: list[_Slot],
              routes: Mapping[int, tuple[frozenset[str], frozenset[str]]]) -> Job | None:
        """The job `slot` should run next, or None to leave the few jobs other actors hold the models of to them:
        an actor holding other models takes such a job only while more of them wait than those actors can take at
        once. (A cold actor takes any: loading in parallel with the holder costs no wall time.)"""
        others = [other for other in slots if other is not slot and not other.dead]
        held_elsewhere = set().union(*(other.models for other in others))

        def score(job: Job) -> tuple[bool, int, int, int, int]:
            models, keys = routes[job.index]
            return (bool(models) and models <= slot.models, len(models & slot.models), len(keys & slot.keys),
                    len(models - held_elsewhere), -job.index)

        job = max(pending, key=score)
        models = routes[job.index][0]
        if not models or not slot.models or models <= slot.models:
            return job
        holders = sum(1 for other in others if models <= other.models)
        waiting = sum(1 for other in pending if routes[other.index][0] == models)
        return None if holders and waiting <= holders else job

    def _hand(self, slot: _Slot, job: Job, template: str, route: tuple[frozenset[str], frozenset[str]]) -> None:
        slot.job = job
        slot.models |= route[0]
        slot.keys |= route[1]
        slot.ticket = uuid.uuid4().hex
        slot.stream = slot.actor.run.options(num_returns="streaming").remote(template, job.params, self.options,
                                                                             slot.ticket)

    def _lost(self, slot: _Slot) -> None:
        """Its actor died while running a job: Ray restarts it, with a new Engine and no models."""
        self.restarts += 1
        slot.models.clear()
        slot.keys.clear()
        slot.revive = slot.actor.ready.remote()

    @staticmethod
    def _revived(slot: _Slot) -> None:
        """The answer to a restarting actor's `ready` call: back (idle), not yet (ask again), or gone for good."""
        try:
            ray.get(slot.revive)
            slot.revive = None
        except ActorUnavailableError:  # still restarting
            time.sleep(_WAIT_S)
            slot.revive = slot.actor.ready.remote()
        except (ActorDiedError, RayActorError):
            slot.revive = None
            slot.dead = True

    def _stop_running(self, slots: list[_Slot]) -> None:
        """Cancel what still runs (Ctrl-C, a failure elsewhere) and wait a little for it to stop. An actor whose
        job still runs then (a node that never looks at its cancel token) is restarted: left running, its job would
        share the Engine and scratch folder with the next sweep's, and hold the thread a cancel call needs."""
        running = [slot for slot in slots if slot.job is not None]
        for slot in running:
            with contextlib.suppress(Exception):
                slot.actor.cancel.remote(slot.ticket)
        deadline = time.monotonic() + _STOP_S
        for slot in running:
            if not _drained(slot.stream, deadline):
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor, no_restart=False)
                slot.models.clear()
                slot.keys.clear()
                slot.revive = slot.actor.ready.remote()
            slot.job = slot.stream = None


def _drained(stream: Any, deadline: float) -> bool:
    """Read a cancelled job's stream to its end; False when it has not ended by `deadline`."""
    while (left := deadline - time.monotonic()) > 0:
        if not ray.wait([stream], timeout=left)[0]:
            return False
        try:
            ray.get(next(stream))
        except Exception:  # StopIteration (its end), the job's error (cancelled) or its actor gone
            return True
    return False


def _check_room(count: int, gpus: int, threads: int, resources: Mapping[str, float]) -> None:
    """Refuse actors the cluster can never hold all at once: Ray would wait for them forever, the sweep silent."""
    cpus = int(resources.get("CPU", 0))
    if gpus and count > gpus:
        raise GraphflowError(f"{count} Ray actors need a GPU each, and the cluster has {gpus}; ask for --actors "
                             f"{gpus} or fewer")
    if not gpus and count * threads > cpus:
        raise GraphflowError(f"{count} Ray actor{'s' if count != 1 else ''} of {threads} thread"
                             f"{'s' if threads != 1 else ''} need {count * threads} CPUs, and the cluster has "
                             f"{cpus}; ask for fewer --actors or --threads-per-actor")


def _last_line(text: str) -> str:
    """The last non-empty line of a Ray error's text: the exception raised on the actor, as Python printed it."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def _cause(error: RayTaskError) -> BaseException:
    """The exception a job raised on its actor, as graphflow raised it there."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, Cancelled):
        return cause
    return cause if isinstance(cause, Exception) else error


def _record(job: Job, value: Mapping[str, Any], out: Path) -> JobRecord:
    """Write a finished job's files into its folder (never over a file) and describe it."""
    folder = out / job.folder
    outside = [name for name, _ in value["files"] if not (folder / name).resolve().is_relative_to(folder.resolve())]
    if outside:  # all names checked before any file is written: a refused job leaves nothing behind
        raise GraphflowError(f"an actor returned a file outside the job's folder: {outside[0]!r}")
    written = []
    for name, data in value["files"]:
        target = folder / name
        if not atomic_write(target, data, exclusive=True):
            raise FileExistsError(f"{target} already exists")
        written.append(target.relative_to(out).as_posix())
    return JobRecord(job, written, list(value["ran"]), list(value["cached"]), float(value["seconds"]))
