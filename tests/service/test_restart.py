"""After kill -9 mid-job, a restart keeps the history and runs the pending jobs (this file sorts after the
other users of the shared server: it kills it and leaves the restarted one to the fixture)."""

from __future__ import annotations

from tests.service.graphs import arithmetic
from tests.service.server import Server


def test_after_kill_9_mid_job_a_restart_keeps_history_and_runs_the_pending_jobs(server: Server) -> None:
    token = (server.data / "token").read_text().strip()
    done = server.wait(server.submit(template="arithmetic", params={"a": 4})["id"])
    slow = server.submit(template="tiny_sd", params={"steps": 100})["id"]
    pending = server.submit(document=arithmetic(), batch={"groups": [{"a": [10, 20]}]})["ids"]
    server.wait_for_event(slow, "node_progress")
    server.kill()
    assert token in server.output  # printed at the first start
    server.start()
    assert (server.data / "token").read_text().strip() == token
    history = {job["id"]: job for job in server.client.get("/api/jobs").json()["jobs"]}
    assert history[done["id"]]["status"] == "completed"
    assert server.client.get(history[done["id"]]["summary"]).json()["outputs"]["sum"]["value"] == 6.0
    crashed = server.wait(slow)
    assert crashed["status"] == "failed" and "stopped" in crashed["error"]["message"]
    assert [server.wait(job_id)["status"] for job_id in pending] == ["completed", "completed"]
    assert [event["kind"] for event in server.events(slow)][-1] == "job_failed"
    server.stop()
    assert server.output.count(token) == 1  # printed once, not at every start
