"""`graphflow serve --backend ray`: a real server whose two workers are Ray actors (on the local cluster the server
starts), with the tiny models: jobs spread over both actors, the same pictures as a local server's, events and
progress in the queue, cancel reaching the actor, and the actors' models kept warm across jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.service.server import Server


def _picture(server: Server, job: dict[str, Any]) -> bytes:
    return server.client.get(job["files"][0]).content


def test_serve_on_ray_runs_jobs_on_both_actors_with_local_pixels(tmp_path: Path, tiny_models: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server(tmp_path / "ray", tiny_models, "--backend", "ray", "--workers", "2", "--no-auth")
    server.start(startup_s=240)  # Ray's start-up (a cluster, two actors importing torch) is slow on a busy machine
    try:
        health = server.client.get("/api/health").json()
        assert health["workers"] == 2 and sorted(health["devices"].values()) == ["ray:0", "ray:1"]
        ids = server.submit(template="tiny_sd", batch={"groups": [{"seed": [1, 2, 3, 4]}]})["ids"]
        jobs = [server.wait(job_id, timeout=240) for job_id in ids]
        assert [job["status"] for job in jobs] == ["completed"] * 4, jobs
        workers = set()
        for job_id in ids:
            events = server.events(job_id)
            kinds = [event["kind"] for event in events]
            assert "node_progress" in kinds and "file_written" in kinds, kinds
            workers.add(next(event["worker"] for event in events if event["kind"] == "job_started"))
        assert workers == {"ray-0", "ray-1"}  # both actors took jobs
        pictures = [_picture(server, job) for job in jobs]
        stopping = server.submit(template="tiny_sd", params={"seed": 9, "steps": 400})["id"]
        server.wait_for_event(stopping, "node_progress")
        assert server.client.post(f"/api/jobs/{stopping}/cancel").status_code == 200
        assert server.wait(stopping, timeout=60)["status"] == "cancelled"  # stopped on its actor, at a step
    finally:
        server.stop()
    # a CPU actor runs torch on one thread; on a CPU the thread count can change a pixel by one 8-bit step
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    local = Server(tmp_path / "local", tiny_models, "--no-auth").start()
    try:
        ids = local.submit(template="tiny_sd", batch={"groups": [{"seed": [1, 2, 3, 4]}]})["ids"]
        assert [_picture(local, local.wait(job_id, timeout=120)) for job_id in ids] == pictures
    finally:
        local.stop()

