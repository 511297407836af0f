"""Workers run queued jobs on their own warm engine, write events, stop a cancelled job only, store results."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphflow.service.config import ServiceConfig
from graphflow.service.queue import CANCELLED, COMPLETED, FAILED, JobQueue, NewJob
from graphflow.service.results import ResultStore
from graphflow.service.worker import WorkerPool
from tests.service.graphs import arithmetic, tiny_sd


@pytest.fixture
def service(tmp_path: Path, tiny_models: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[JobQueue, WorkerPool]]:
    monkeypatch.setenv("GRAPHFLOW_TINY_MODELS", str(tiny_models))
    config = ServiceConfig(data=tmp_path / "data", graphs=tmp_path)
    config.prepare()
    queue = JobQueue(config.database)
    pool = WorkerPool(config, queue, ResultStore(config.results), lambda name: None, registry=None)
    pool.start()
    yield queue, pool
    pool.stop()


def wait_for(queue: JobQueue, job_id: str, statuses: tuple[str, ...], timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = queue.get(job_id)
        if job is not None and job.status in statuses:
            return job.status
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not reach {statuses}")


def test_a_job_runs_with_its_events_in_order_and_its_result_stored(service: tuple[JobQueue, WorkerPool]) -> None:
    queue, pool = service
    [job_id] = queue.submit([NewJob(arithmetic(), {"a": 5.0, "word": "y"}, {})])
    pool.notify()
    assert wait_for(queue, job_id, (COMPLETED, FAILED)) == COMPLETED
    kinds = [event.kind for event in queue.events(job_id=job_id)]
    assert kinds[:3] == ["job_queued", "job_started", "run_started"] and kinds[-1] == "job_completed"
    assert kinds.count("node_started") == 2 and kinds.count("node_finished") == 2
    summary = pool.workers[0].store.summary(queue.get(job_id).result)  # type: ignore[arg-type,union-attr]
    assert summary is not None and summary["outputs"]["sum"]["value"] == 7.0
    assert summary["outputs"]["text"]["value"] == "y!"


def test_cancelling_a_running_job_stops_it_at_a_step_and_the_next_job_runs(
        service: tuple[JobQueue, WorkerPool]) -> None:
    queue, pool = service
    slow, after = queue.submit([NewJob(tiny_sd(steps=100), {}, {}, models=("tiny:sd15",)),
                                NewJob(arithmetic(), {}, {})])
    pool.notify()
    deadline = time.monotonic() + 30
    while not any(event.kind == "node_progress" for event in queue.events(job_id=slow)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    queue.cancel(slow)
    assert wait_for(queue, slow, (CANCELLED, COMPLETED, FAILED)) == CANCELLED
    assert time.monotonic() - started < 5
    steps = [event.data["step"] for event in queue.events(job_id=slow) if event.kind == "node_progress"]
    assert max(steps) < 100
    assert wait_for(queue, after, (COMPLETED, FAILED)) == COMPLETED
    assert pool.workers[0].held_models() == {"tiny:sd15"}


def test_a_failing_node_fails_its_job_with_the_node_named_and_the_worker_goes_on(
        service: tuple[JobQueue, WorkerPool]) -> None:
    queue, pool = service
    broken = arithmetic()
    broken["nodes"]["sum"]["inputs"].update(op="div", b=0)
    failing, fine = queue.submit([NewJob(broken, {}, {}), NewJob(arithmetic(), {}, {})])
    pool.notify()
    assert wait_for(queue, failing, (COMPLETED, FAILED)) == FAILED
    error = queue.get(failing).error  # type: ignore[union-attr]
    assert error is not None and error["node"] == "sum" and "division by zero" in error["message"]
    assert [event.kind for event in queue.events(job_id=failing)][-2:] == ["node_failed", "job_failed"]
    assert wait_for(queue, fine, (COMPLETED, FAILED)) == COMPLETED


def test_stopping_the_server_mid_job_fails_the_job_rather_than_calling_it_cancelled(
        service: tuple[JobQueue, WorkerPool]) -> None:
    queue, pool = service
    [slow] = queue.submit([NewJob(tiny_sd(steps=100), {}, {})])
    pool.notify()
    deadline = time.monotonic() + 30
    while not any(event.kind == "node_progress" for event in queue.events(job_id=slow)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pool.stop()
    job = queue.get(slow)
    assert job is not None and job.status == FAILED and "stopped" in job.error["message"]  # type: ignore[index]
