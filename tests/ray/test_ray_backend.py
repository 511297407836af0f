"""The Ray backend on a real two-raylet cluster with two actors and the tiny models: the same pixels as a local
sweep, each model loaded once per actor, jobs routed to the actor holding their models, an actor killed with
SIGKILL mid-job still gives every job once, failures and Ctrl-C stop the sweep, and the actors stay warm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from graphflow import Engine
from graphflow.errors import Cancelled, NodeExecutionError
from graphflow.events import CancelToken, NodeProgress, NodeStarted
from graphflow.models import ModelManager
from graphflow.sweep_runner import run_sweep
from graphflow.sweeps import sweep_batch

ROOT = Path(__file__).resolve().parents[2]
CANNY = ROOT / "graphs/controlnet_canny.json"
TINY = {"checkpoint": "tiny:sd15", "controlnet": "tiny:controlnet-canny", "steps": 2, "width": 64, "height": 48}
FIXED = [f"{name}={value}" for name, value in TINY.items()]


def _batch(grid: list[str], fixed: list[str] = FIXED) -> Any:
    return sweep_batch(json.loads(CANNY.read_text()), grid=grid, fixed=fixed)


@pytest.fixture(scope="module")
def backend(cluster: Any) -> Any:
    from graphflow.ray_backend import RayBackend

    made = RayBackend(engine=Engine(input_dirs=[ROOT]), threads=1)
    made.start()
    yield made
    made.close()


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Path:
    """The 8-seed sweep run locally: what every Ray run of it must equal."""
    os.environ["GRAPHFLOW_TINY_MODELS"] = str(tiny_models)
    out = tmp_path_factory.mktemp("local") / "out"
    run_sweep(CANNY, _batch(["seed=0..7"]), out, engine=Engine(input_dirs=[ROOT], output_dir=out,
                                                              models=ModelManager()), on_event=_count_progress)
    return out


LOCAL_PROGRESS: Counter[int] = Counter()  # NodeProgress events per job of the local sweep


def _count_progress(job: Any, event: Any, counts: Counter[int] = LOCAL_PROGRESS) -> None:
    if isinstance(event, NodeProgress):
        counts[job.index] += 1


def _pictures(out: Path) -> dict[str, np.ndarray]:
    return {path.relative_to(out).as_posix(): np.asarray(Image.open(path))
            for path in sorted(out.glob("*/*.png"))}


def _assert_same_sweep(out: Path, reference: Path) -> None:
    ours, theirs = _pictures(out), _pictures(reference)
    assert sorted(ours) == sorted(theirs) and len(ours) == 8
    for name, pixels in theirs.items():
        assert np.array_equal(ours[name], pixels), name
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["complete"] and [job["index"] for job in summary["jobs"]] == list(range(8))
    assert [job["files"] for job in summary["jobs"]] == \
        [job["files"] for job in json.loads((reference / "sweep.json").read_text())["jobs"]]


def test_two_actors_on_two_raylets_equal_the_local_sweep_and_load_each_model_once(
        backend: Any, local_sweep: Path, tmp_path: Path) -> None:
    import ray

    nodes = ray.get([slot.actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
                     for slot in backend.slots])
    assert len(backend.slots) == 2 and len(set(nodes)) == 2  # one actor on each raylet
    progress: Counter[int] = Counter()
    out = tmp_path / "ray"
    result = run_sweep(CANNY, _batch(["seed=0..7"]), out, backend=backend,
                       on_event=lambda job, event: _count_progress(job, event, progress))
    _assert_same_sweep(out, local_sweep)
    assert progress == LOCAL_PROGRESS and len(progress) == 8  # every job's progress reached the driver's bar
    loads = backend.model_loads()
    assert all(loads) and all(set(counts.values()) == {1} for counts in loads)  # both actors worked, loading once
    ran = Counter(node for record in result.jobs for node in record.ran)
    assert ran["edges"] == 2 and ran["sample"] == 8  # shared nodes once per actor; the sampler once per job
    assert sorted(path.name for path in out.iterdir() if path.is_file()) == ["contact_sheet.png", "sweep.json"]


def test_an_actor_killed_mid_job_is_restarted_and_every_job_ends_once(
        backend: Any, local_sweep: Path, tmp_path: Path) -> None:
    pids = backend.actor_pids()
    killed: list[int] = []

    def kill_the_actor_running_job_3(job: Any, event: Any) -> None:
        if job.index == 3 and isinstance(event, NodeStarted) and not killed:  # (its sampler may be cached)
            slot = next(slot for slot in backend.slots if slot.job is not None and slot.job.index == 3)
            killed.append(pids[slot.index])
            os.kill(pids[slot.index], signal.SIGKILL)

    restarts = backend.restarts
    out = tmp_path / "ray"
    result = run_sweep(CANNY, _batch(["seed=0..7"]), out, backend=backend, on_event=kill_the_actor_running_job_3)
    assert killed and backend.restarts == restarts + 1
    assert sorted(record.job.index for record in result.jobs) == list(range(8))  # each job once
    _assert_same_sweep(out, local_sweep)
    assert [len(list(folder.iterdir())) for folder in sorted(out.iterdir()) if folder.is_dir()] == [1] * 8
    now = backend.actor_pids()
    assert killed[0] not in now and len(set(now) & set(pids)) == 1  # Ray restarted it: a new process


def test_a_failing_job_stops_the_sweep_with_the_node_error(backend: Any, tmp_path: Path) -> None:
    template = tmp_path / "divide.json"
    template.write_text(json.dumps({"graphflow": 1, "params": {"b": {"type": "FLOAT", "default": 1.0}}, "nodes": {
        "one": {"type": "Float", "inputs": {"value": 1.0}},
        "q": {"type": "Math", "inputs": {"a": {"from": "one.value"}, "b": {"param": "b"}, "op": "div"}}},
        "outputs": {"q": "q.result"}}))
    from graphflow.batches import Batch

    with pytest.raises(NodeExecutionError, match="division by zero") as raised:
        run_sweep(template, Batch(groups=({"b": [1.0, 0.0, 2.0, 4.0]},)), tmp_path / "out", backend=backend)
    assert raised.value.node == "q"
    summary = json.loads((tmp_path / "out/sweep.json").read_text())
    assert not summary["complete"] and 0.0 not in [job["params"]["b"] for job in summary["jobs"]]


def test_cancelling_stops_the_running_jobs_and_the_actors_stay_warm(
        backend: Any, local_sweep: Path, tmp_path: Path) -> None:
    token = CancelToken()
    with pytest.raises(Cancelled):
        run_sweep(CANNY, _batch(["seed=0..7"]), tmp_path / "stopped", backend=backend,
                  on_job=lambda record: token.cancel(), cancel=token)
    summary = json.loads((tmp_path / "stopped/sweep.json").read_text())
    assert not summary["complete"] and 1 <= len(summary["jobs"]) < 8
    assert all(slot.job is None for slot in backend.slots)  # nothing left running
    out = tmp_path / "again"
    run_sweep(CANNY, _batch(["seed=0..7"]), out, backend=backend)  # the same actors, still usable
    _assert_same_sweep(out, local_sweep)
    # warm across sweeps: no model loaded twice by one actor (the one restarted above loaded again, once)
    assert all(set(counts.values()) == {1} for counts in backend.model_loads())


def test_ctrl_c_on_the_command_line_cancels_the_whole_sweep(tiny_models: Path, tmp_path: Path) -> None:
    """`graphflow sweep --backend ray` starts its own local cluster; SIGINT after the first job ends it: exit 130,
    the finished jobs listed, nothing left running."""
    command = [sys.executable, "-m", "graphflow.cli", "sweep", str(CANNY), "--backend", "ray", "--actors", "1",
               "--grid", "seed=0..30", *(part for item in FIXED for part in ("--set", item)), "--out", "out",
               "--input-dir", str(ROOT), "--quiet"]
    env = {**os.environ, "GRAPHFLOW_TINY_MODELS": str(tiny_models), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    summary = tmp_path / "out/sweep.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if summary.exists() and json.loads(summary.read_text())["jobs"]:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert time.monotonic() - started < 30 and "interrupted" in stderr
    done = json.loads(summary.read_text())
    assert not done["complete"] and 1 <= len(done["jobs"]) < 31
    folders = sorted(path.name for path in (tmp_path / "out").iterdir() if path.is_dir())
    assert folders == [job["folder"] for job in done["jobs"]]  # no job wrote outside the summary
