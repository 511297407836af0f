"""Attacks on the Ray backend, on the two-raylet cluster with two actors and a plugin of cheap nodes
(tests/ray/attack_plugin.py): a job that kills every actor it touches fails the sweep after MAX_TRIES, actors
killed while idle or both at once, cancel while an actor restarts, a failure while another job runs, Ctrl-C from
on_job, a graph without output nodes equal to a local sweep, two sweeps on warm actors, and file names that would
leave a job's folder."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from graphflow import Engine
from graphflow.batches import Batch
from graphflow.errors import Cancelled, GraphflowError, NodeExecutionError, ValidationError
from graphflow.events import CancelToken, NodeProgress
from graphflow.sweep_runner import JobFailed, JobRecord, run_sweep

PLUGIN = "tests.ray.attack_plugin"
PARAMS = {"seed": ("INT", 0), "seconds": ("FLOAT", 0.0), "crash": ("INT", -1), "fail": ("INT", -1),
          "crash_once": ("STRING", ""), "deaf": ("BOOL", False)}


def _template(folder: Path, *, save: bool = True, output: str = "pic") -> Path:
    """AttackPaint fed by every param, saved by SaveImage (prefix pic) or, with `save` False, given as output
    `output` (which a sweep writes as OUTPUT_00000.png)."""
    nodes: dict[str, Any] = {"paint": {"type": "AttackPaint", "inputs": {name: {"param": name} for name in PARAMS}}}
    if save:
        nodes["save"] = {"type": "SaveImage", "inputs": {"image": {"from": "paint.image"}, "prefix": "pic"}}
    document = {"graphflow": 1, "params": {name: {"type": kind, "default": default}
                                           for name, (kind, default) in PARAMS.items()},
                "nodes": nodes, "outputs": {} if save else {output: "paint.image"}}
    path = folder / ("saved.json" if save else f"{len(output)}-unsaved.json")
    path.write_text(json.dumps(document))
    return path


def _batch(seeds: range, **fixed: Any) -> Batch:
    return Batch(groups=({"seed": list(seeds)},), fixed=fixed)


def _engine(out: Path | None = None) -> Engine:
    return Engine(plugins=(PLUGIN,), output_dir=out)


@pytest.fixture(scope="module")
def backend(cluster: Any) -> Any:
    from graphflow.ray_backend import RayBackend

    made = RayBackend(engine=_engine(), plugins=[PLUGIN], threads=1)
    made.start()
    yield made
    made.close()


def test_serve_on_ray_an_actor_killed_mid_job_fails_that_job_clearly_and_the_next_runs_on_the_restarted_one(
        cluster: Any, tmp_path: Path) -> None:
    """The service's Ray worker pool on the test cluster (one actor; first in this file, while the cluster has a
    CPU free): a job whose actor dies fails saying so; the next job runs on the restarted actor."""
    from graphflow.registry import default_registry
    from graphflow.service.config import ServiceConfig
    from graphflow.service.queue import COMPLETED, FAILED, JobQueue, NewJob
    from graphflow.service.ray_workers import RayWorkerPool
    from graphflow.service.results import ResultStore

    config = ServiceConfig(data=tmp_path / "data", graphs=tmp_path, plugins=(PLUGIN,), backend="ray", ray_actors=1)
    config.data.mkdir()
    queue, store = JobQueue(config.database), ResultStore(config.results)
    pool = RayWorkerPool(config, queue, store, lambda name: None, default_registry((PLUGIN,)))
    pool.start()
    try:
        document = json.loads(_template(tmp_path, save=False).read_text())
        marker = tmp_path / "crash-once"
        marker.touch()
        pid = pool.backend.actor_pids()[0]

        def finished(job_id: str, patience_s: float = 60) -> Any:
            deadline = time.monotonic() + patience_s
            while (job := queue.get(job_id)).status not in (COMPLETED, FAILED, "cancelled"):
                assert time.monotonic() < deadline, job
                time.sleep(0.05)
            return job

        [dying] = queue.submit([NewJob(document, {"seed": 1, "crash_once": str(marker)}, {})])
        pool.notify()
        job = finished(dying)
        assert job.status == FAILED and "the Ray actor running the job died" in job.error["message"], job.error
        assert not marker.exists()
        [after] = queue.submit([NewJob(document, {"seed": 2}, {})])
        pool.notify()
        job = finished(after)
        assert job.status == COMPLETED, job.error
        assert pool.backend.actor_pids()[0] != pid  # on the restarted actor
        [failing] = queue.submit([NewJob(document, {"seed": 3, "fail": 3}, {})])
        pool.notify()
        job = finished(failing)
        assert job.status == FAILED and "seed 3 is the failing one" in job.error["message"], job.error
        events = [(event.kind, event.data.get("node")) for event in queue.events(job_id=failing)]
        # as a local worker records them: what ran up to the failure, and which node failed (ComfyUI's
        # execution_error and the web page name it)
        assert ("node_started", "paint") in events and ("node_failed", "paint") in events, events
    finally:
        pool.stop()
        queue.close()


def test_actors_the_cluster_cannot_hold_or_start_are_refused_with_the_reason(cluster: Any) -> None:
    """More actors (or threads) than the cluster's CPUs would wait forever; an actor whose Engine cannot import a
    plugin dies in its creation: both fail at once, saying why (before the module's backend holds the CPUs)."""
    from graphflow.ray_backend import RayBackend

    for actors, threads in ((3, 1), (None, 4)):
        started = time.monotonic()
        with pytest.raises(GraphflowError, match=r"need (3|4) CPUs, and the cluster has 2"):
            RayBackend(plugins=[PLUGIN], actors=actors, threads=threads).start()
        assert time.monotonic() - started < 5
    broken = RayBackend(plugins=["tests.ray.no_such_plugin"], actors=1)
    with pytest.raises(GraphflowError, match=r"actors could not start: .*cannot import plugin module "
                                             r"'tests\.ray\.no_such_plugin'.* importable on each machine"):
        broken.start()
    assert broken.slots == []


def _sweep(template: Path, batch: Batch, out: Path, backend: Any, **kwargs: Any) -> Any:
    return run_sweep(template, batch, out, engine=_engine(), backend=backend, **kwargs)


def _check_summary(out: Path) -> dict[str, Any]:
    """sweep.json lists no job twice, every file it lists exists, and no job folder lies outside it."""
    summary = json.loads((out / "sweep.json").read_text())
    indexes = [job["index"] for job in summary["jobs"]]
    assert len(indexes) == len(set(indexes)), indexes
    for job in summary["jobs"]:
        assert job["files"] and all((out / name).is_file() for name in job["files"]), job
    folders = sorted(path.name for path in out.iterdir() if path.is_dir())
    assert folders == sorted(job["folder"] for job in summary["jobs"])
    assert sorted(str(path.relative_to(out)) for path in out.glob("*/**/*") if path.is_file()) == \
        sorted(name for job in summary["jobs"] for name in job["files"])
    return summary


def _files(out: Path) -> dict[str, bytes]:
    return {path.relative_to(out).as_posix(): path.read_bytes() for path in sorted(out.glob("*/*.png"))}


def _on_actor(slot: Any, function: Any) -> Any:
    """What `function(actor instance)` returns on the slot's actor, waiting while Ray restarts it."""
    import ray
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + 60
    while True:
        try:
            return ray.get(slot.actor.__ray_call__.remote(function))
        except ActorUnavailableError:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def _scratch(backend: Any) -> list[str]:
    return [_on_actor(slot, lambda actor: str(actor.scratch)) for slot in backend.slots]


def _wait_idle(backend: Any, patience_s: float = 60) -> None:
    """Until every actor answers again (after the kills of a test), so the next test starts from live actors."""
    backend.actor_pids()
    deadline = time.monotonic() + patience_s
    while any(slot.revive is not None for slot in backend.slots) and time.monotonic() < deadline:
        for slot in backend.slots:
            if slot.revive is not None:
                backend._revived(slot)


def test_a_job_that_kills_every_actor_fails_the_sweep_after_max_tries(backend: Any, tmp_path: Path) -> None:
    from graphflow.ray_backend import MAX_TRIES

    scratch = _scratch(backend)
    restarts = backend.restarts
    started = time.monotonic()
    with pytest.raises(GraphflowError, match=f"job 2 .* lost its Ray actor {MAX_TRIES} times") as raised:
        _sweep(_template(tmp_path), _batch(range(4), crash=2), tmp_path / "out", backend)
    assert type(raised.value) is JobFailed and time.monotonic() - started < 60  # the command line exits 3
    assert backend.restarts == restarts + MAX_TRIES
    summary = _check_summary(tmp_path / "out")
    assert not summary["complete"] and 2 not in [job["index"] for job in summary["jobs"]]
    assert all(slot.job is None for slot in backend.slots)
    _wait_idle(backend)
    assert _scratch(backend) == scratch and all(Path(folder).is_dir() for folder in scratch)  # no folder per restart


def test_a_graph_without_output_nodes_equals_the_local_sweep_and_a_second_sweep_runs_warm(
        backend: Any, tmp_path: Path) -> None:
    template = _template(tmp_path, save=False)
    local = tmp_path / "local"
    run_sweep(template, _batch(range(6), seconds=0.1), local, engine=_engine(local))
    _wait_idle(backend)
    pids = backend.actor_pids()
    first = _sweep(template, _batch(range(6), seconds=0.1), tmp_path / "ray", backend)
    assert _files(tmp_path / "ray") == _files(local) and len(_files(local)) == 6
    assert {Path(name).name for record in first.jobs for name in record.files} == {"pic_00000.png"}
    assert len({record.job.index for record in first.jobs}) == 6
    second = _sweep(template, _batch(range(6), seconds=0.1), tmp_path / "again", backend)
    assert _files(tmp_path / "again") == _files(local)
    assert backend.actor_pids() == pids  # the same two processes, kept warm
    assert [record.ran for record in second.jobs] == [[]] * 6  # each job on the actor that ran it: all cached
    for out in (tmp_path / "ray", tmp_path / "again"):
        assert _check_summary(out)["complete"]


def test_an_actor_killed_while_idle_between_jobs_is_restarted_and_every_job_ends_once(
        backend: Any, tmp_path: Path) -> None:
    _wait_idle(backend)
    pids = backend.actor_pids()
    killed: list[int] = []

    def kill_an_idle_actor(record: JobRecord) -> None:
        if not killed:  # its job just ended: the driver hands it the next one only after this returns
            slot = next(slot for slot in backend.slots if slot.job is None)
            killed.append(pids[slot.index])
            os.kill(pids[slot.index], signal.SIGKILL)
            time.sleep(0.3)  # dead, not yet restarted, when the next job is handed to it

    out = tmp_path / "out"
    result = _sweep(_template(tmp_path), _batch(range(6), seconds=0.2), out, backend, on_job=kill_an_idle_actor)
    assert killed and sorted(record.job.index for record in result.jobs) == list(range(6))
    assert _check_summary(out)["complete"]
    assert [len(list(folder.iterdir())) for folder in sorted(out.iterdir()) if folder.is_dir()] == [1] * 6
    assert killed[0] not in backend.actor_pids()


def test_both_actors_killed_at_once_mid_job_and_every_job_still_ends_once(backend: Any, tmp_path: Path) -> None:
    _wait_idle(backend)
    pids = backend.actor_pids()
    killed: list[int] = []

    def kill_both(job: Any, event: Any) -> None:
        if isinstance(event, NodeProgress) and not killed and all(slot.job is not None for slot in backend.slots):
            killed.extend(pids)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)

    restarts = backend.restarts
    out = tmp_path / "out"
    result = _sweep(_template(tmp_path), _batch(range(4), seconds=0.5), out, backend, on_event=kill_both)
    assert killed and backend.restarts == restarts + 2
    assert sorted(record.job.index for record in result.jobs) == list(range(4))
    assert _check_summary(out)["complete"]
    assert not set(backend.actor_pids()) & set(pids)


def test_cancel_while_an_actor_restarts_stops_at_once_and_the_backend_still_works(
        backend: Any, tmp_path: Path) -> None:
    _wait_idle(backend)
    marker = tmp_path / "crash-once"
    marker.touch()
    token = CancelToken()

    def cancel_once_restarting(job: Any, event: Any) -> None:
        if any(slot.revive is not None for slot in backend.slots):
            token.cancel()

    started = time.monotonic()
    with pytest.raises(Cancelled):
        _sweep(_template(tmp_path), _batch(range(8), seconds=0.3, crash_once=str(marker)), tmp_path / "out",
               backend, on_event=cancel_once_restarting, cancel=token)
    assert time.monotonic() - started < 20 and not marker.exists()
    assert all(slot.job is None for slot in backend.slots)
    summary = _check_summary(tmp_path / "out")
    assert not summary["complete"] and len(summary["jobs"]) < 8
    again = _sweep(_template(tmp_path), _batch(range(3)), tmp_path / "again", backend)
    assert again.complete and len(again.jobs) == 3


def test_a_failing_job_cancels_the_one_running_on_the_other_actor_and_nothing_is_written_after_it(
        backend: Any, tmp_path: Path) -> None:
    """Job 1 fails at once while job 0 runs for 6 s on the other actor: the sweep stops within a second or two,
    job 0 is cancelled on its actor (no folder), and both actors take the next sweep."""
    _wait_idle(backend)
    out = tmp_path / "out"
    template = _template(tmp_path)
    started = time.monotonic()
    seen: list[tuple[int, str]] = []
    with pytest.raises(NodeExecutionError, match="seed 1 is the failing one"):
        _sweep(template, Batch(groups=({"seed": [0, 1], "seconds": [6.0, 0.0]},), fixed={"fail": 1}), out, backend,
               on_event=lambda job, event: seen.append((job.index, type(event).__name__)))
    assert time.monotonic() - started < 4
    assert (1, "NodeStarted") in seen and (1, "NodeFailed") in seen  # as a local sweep's on_event sees them
    time.sleep(0.5)  # whatever would still arrive
    summary = _check_summary(out)
    assert summary["jobs"] == [] and not list(out.glob("*/"))
    assert all(slot.job is None for slot in backend.slots)
    assert _sweep(template, _batch(range(2)), tmp_path / "again", backend).complete


def test_ctrl_c_from_on_job_stops_the_sweep_and_leaves_nothing_running(backend: Any, tmp_path: Path) -> None:
    _wait_idle(backend)
    out = tmp_path / "out"

    def interrupt(record: JobRecord) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _sweep(_template(tmp_path), _batch(range(6), seconds=0.4), out, backend, on_job=interrupt)
    assert all(slot.job is None for slot in backend.slots)  # the other running job was cancelled and drained
    time.sleep(0.5)
    summary = _check_summary(out)
    assert not summary["complete"] and len(summary["jobs"]) == 1
    assert _sweep(_template(tmp_path), _batch(range(2)), tmp_path / "again", backend).complete


def test_a_file_name_leaving_the_job_folder_is_refused_before_anything_runs_or_is_written(
        backend: Any, tmp_path: Path) -> None:
    """An output named ../../escape would be written as ../../escape_00000.png: refused when the sweep is planned,
    on either backend; and the driver refuses such a name from an actor before writing any of the job's files."""
    from graphflow.ray_backend import _record
    from graphflow.sweep_runner import Job

    template = _template(tmp_path, save=False, output="../../escape")
    for name, chosen in (("local", None), ("ray", backend)):
        out = tmp_path / name / "deep" / "out"
        with pytest.raises(ValidationError, match="escape"):
            run_sweep(template, _batch(range(2)), out, engine=_engine(out), backend=chosen)
        assert not list((tmp_path / name).rglob("*.png"))
    job = Job(0, {}, "0000")
    for bad in ("../x.png", "/tmp/x.png", "a/../../x.png"):
        with pytest.raises(GraphflowError, match="outside the job's folder"):
            _record(job, {"files": [("fine.png", b"1"), (bad, b"2")], "ran": [], "cached": [], "seconds": 0},
                    tmp_path / "record")
        assert not list((tmp_path / "record").rglob("*")) or not list((tmp_path / "record").rglob("*.png"))
    assert Counter(path.suffix for path in tmp_path.rglob("*.png")) == Counter()


def test_a_job_deaf_to_cancel_gets_its_actor_restarted_so_nothing_of_the_stopped_sweep_runs_on(
        backend: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Job 1 fails while job 0 sleeps 6 s without looking at its cancel token: once the stop deadline passes the
    driver restarts job 0's actor, so no job of the stopped sweep still runs when run_sweep returns (it would share
    the actor's Engine and scratch folder with the next sweep's jobs)."""
    import threading

    import graphflow.ray_backend

    monkeypatch.setattr(graphflow.ray_backend, "_STOP_S", 0.5)
    _wait_idle(backend)
    pids = backend.actor_pids()
    template = _template(tmp_path)
    started = time.monotonic()
    with pytest.raises(NodeExecutionError, match="seed 1 is the failing one"):
        _sweep(template, Batch(groups=({"seed": [0, 1], "seconds": [6.0, 0.0]},), fixed={"fail": 1, "deaf": True}),
               tmp_path / "out", backend)
    assert time.monotonic() - started < 4
    jobs = [_on_actor(slot, lambda actor: [thread.name for thread in threading.enumerate()
                                           if thread.name == "graphflow-ray-job"]) for slot in backend.slots]
    assert jobs == [[], []]
    assert len(set(backend.actor_pids()) & set(pids)) == 1  # the deaf job's actor was restarted, the other kept
    time.sleep(0.5)
    assert _check_summary(tmp_path / "out")["jobs"] == []
    again = _sweep(template, _batch(range(4)), tmp_path / "again", backend)
    assert again.complete and sorted(Path(name).name for r in again.jobs for name in r.files) == ["pic_00000.png"] * 4


def test_outside_an_actor_each_scratch_folder_is_its_own(cluster: Any) -> None:
    """The driver has no actor id: its scratch folders are fresh ones, never a shared graphflow-ray-None."""
    import shutil

    from graphflow.ray_actor import _scratch_folder

    folders = [_scratch_folder(), _scratch_folder()]
    try:
        assert folders[0] != folders[1] and all(folder.is_dir() for folder in folders)
        assert not any(folder.name.endswith("None") for folder in folders)
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
