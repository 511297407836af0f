"""One worker per device: `--devices LIST` gives each worker its own Engine and ModelManager running on its device;
`--workers N` keeps N workers on `--device`; the two disagreeing is a usage error."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from graphflow.service.cli import _device_list, _worker_devices
from graphflow.service.config import ServiceConfig
from graphflow.service.queue import COMPLETED, FAILED, RUNNING, JobQueue, NewJob
from graphflow.service.results import ResultStore
from graphflow.service.worker import WorkerPool
from tests.service.graphs import arithmetic, tiny_sd
from tests.service.server import Server, checkout_env
from tests.service.test_worker import wait_for


def _args(devices: str | None = None, workers: int | None = None, device: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(devices=_device_list(devices) if devices else None, workers=workers, device=device)


def test_devices_give_one_worker_each_and_workers_repeat_the_device() -> None:
    assert _device_list("cuda:0, cuda:1") == ("cuda:0", "cuda:1")
    assert _worker_devices(_args("cpu,cpu")) == ("cpu", "cpu")
    assert _worker_devices(_args("cuda:0,cuda:1", workers=2)) == ("cuda:0", "cuda:1")  # they agree
    assert _worker_devices(_args("cpu,cpu", device="cpu")) == ("cpu", "cpu")
    assert _worker_devices(_args(workers=3, device="cpu")) == ("cpu", "cpu", "cpu")
    assert _worker_devices(_args()) == ("auto",)
    assert "disagree" in str(_worker_devices(_args("cpu,cpu", workers=3)))
    assert "disagree" in str(_worker_devices(_args("cuda:0,cpu", device="cpu")))
    for bad in ("cuda:x", "gpu", "cpu,,cpu", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            _device_list(bad)
    config = ServiceConfig(data=Path("d"), graphs=Path("g"), workers=2, options={"device": "cpu"})
    assert config.worker_devices() == ("cpu", "cpu")
    assert ServiceConfig(data=Path("d"), graphs=Path("g"), devices=("cuda:1",)).worker_devices() == ("cuda:1",)


@pytest.mark.parametrize("flags", [("--devices", "cpu,cpu", "--workers", "3"), ("--devices", "cuda:0,cpu",
                                                                                  "--device", "cpu"),
                                   ("--devices", "gpu0")])
def test_disagreeing_or_malformed_device_flags_are_a_usage_error(tmp_path: Path, flags: tuple[str, ...]) -> None:
    done = subprocess.run([sys.executable, "-m", "graphflow.cli", "serve", "--data", str(tmp_path / "data"),
                           "--graphs", str(tmp_path), "--port", "1", *flags], capture_output=True, text=True,
                          timeout=60, env=checkout_env(HF_HUB_OFFLINE="1"))
    assert done.returncode == 2, done.stderr
    assert "usage:" in done.stderr and "--devices" in done.stderr and "unrecognized" not in done.stderr
    assert not (tmp_path / "data" / "queue.db").exists()  # refused before anything started


def test_two_cpu_workers_each_take_jobs_on_their_own_engine(tmp_path: Path, tiny_models: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHFLOW_TINY_MODELS", str(tiny_models))
    config = ServiceConfig(data=tmp_path / "data", graphs=tmp_path, devices=("cpu", "cpu"))
    config.prepare()
    queue = JobQueue(config.database)
    pool = WorkerPool(config, queue, ResultStore(config.results), lambda name: None, registry=None)
    first, second = pool.workers
    assert (first.device, second.device) == ("cpu", "cpu")
    assert first.engine is not second.engine and first.engine.models is not second.engine.models
    assert first.engine.options["device"] == second.engine.options["device"] == "cpu"
    pool.start()
    try:
        [slow] = queue.submit([NewJob(tiny_sd(steps=200), {}, {}, models=("tiny:sd15",))])
        pool.notify()
        assert wait_for(queue, slow, (RUNNING, COMPLETED, FAILED)) == RUNNING
        # while one worker is busy with the slow job, the other takes the next ones
        quick = queue.submit([NewJob(arithmetic(), {"a": float(a)}, {}) for a in range(3)])
        pool.notify()
        assert [wait_for(queue, job, (COMPLETED, FAILED)) for job in quick] == [COMPLETED] * 3
        assert queue.get(slow).status == RUNNING  # type: ignore[union-attr]
        queue.cancel(slow)
        wait_for(queue, slow, ("cancelled", COMPLETED, FAILED))
        started = {job: next(e.data for e in queue.events(job_id=job) if e.kind == "job_started")
                   for job in (slow, *quick)}
    finally:
        pool.stop()
    assert all(data["device"] == "cpu" for data in started.values())
    assert {started[job]["worker"] for job in quick} == {"worker-0", "worker-1"} - {started[slow]["worker"]}
    assert {queue.get(job).worker for job in (slow, *quick)} == {"worker-0", "worker-1"}  # type: ignore[union-attr]


def test_health_reports_each_workers_device(tmp_path: Path, tiny_models: Path) -> None:
    server = Server(tmp_path, tiny_models, "--devices", "cpu,cpu").start()
    try:
        health = httpx.get(f"{server.url}/api/health").json()
        assert health["workers"] == 2 and health["devices"] == {"worker-0": "cpu", "worker-1": "cpu"}
        ids = server.submit(template="arithmetic", batch={"groups": [{"a": [1.0, 2.0, 3.0, 4.0]}]})["ids"]
        deadline = time.monotonic() + 60
        for job_id in ids:
            assert server.wait(job_id, timeout=max(1.0, deadline - time.monotonic()))["status"] == "completed"
        started = [event for job_id in ids for event in server.events(job_id) if event["kind"] == "job_started"]
        assert len(started) == 4 and all(event["device"] == "cpu" for event in started)
    finally:
        server.stop()
