"""The HTTP API against a real `graphflow serve` subprocess: jobs, batches, events, results, cancel, auth, limits."""

from __future__ import annotations

import io
import json
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.graphs import arithmetic, tiny_sd
from tests.service.server import Server


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_route_but_health_needs_the_token_kept_with_mode_0600(server: Server) -> None:
    assert httpx.get(f"{server.url}/api/health").status_code == 200
    for path in ("/api/jobs", "/api/templates", "/api/events", "/openapi.json", "/api/files/x.png"):
        assert httpx.get(f"{server.url}{path}").status_code == 401, path
    wrong = httpx.get(f"{server.url}/api/jobs", headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert stat.S_IMODE((server.data / "token").stat().st_mode) == 0o600
    paths = server.client.get("/openapi.json").json()["paths"]
    assert {"/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/events", "/api/images"} <= set(paths)


def test_cors_answers_only_the_listed_origins(server: Server) -> None:
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(f"{server.url}/api/jobs", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})

    assert preflight("http://allowed.example").headers["access-control-allow-origin"] == "http://allowed.example"
    refused = preflight("http://evil.example")
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers


def test_the_queue_stream_carries_every_job_from_an_event_id(server: Server) -> None:
    start = server.events(server.submit(template="arithmetic")["id"])[-1]["id"]
    ids = server.submit(document=arithmetic(), batch={"groups": [{"a": [3, 4]}]})["ids"]
    finished: list[str] = []
    with server.client.stream("GET", "/api/events", headers={"Last-Event-ID": str(start)}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["job"] in ids
                if event["kind"] == "job_completed":
                    finished.append(event["job"])
                if len(finished) == 2:
                    break
    assert finished == ids


def test_templates_are_listed_with_their_params(server: Server) -> None:
    templates = {item["name"]: item for item in server.client.get("/api/templates").json()}
    assert set(templates) == {"arithmetic", "tiny_sd"}
    assert templates["arithmetic"]["params"]["a"] == {"type": "FLOAT", "list": False, "description": "",
                                                      "required": False, "default": 1.0, "min": -100.0,
                                                      "max": 100.0, "choices": None}
    assert templates["arithmetic"]["params"]["word"]["choices"] == ["x", "y", "z"]


def test_a_job_streams_its_events_in_order_and_replays_after_last_event_id(server: Server) -> None:
    job_id = server.submit(template="arithmetic", params={"a": 5, "word": "z"})["id"]
    events = server.events(job_id)
    kinds = [event["kind"] for event in events]
    assert kinds == ["job_queued", "job_started", "run_started", "node_started", "node_finished", "node_started",
                     "node_finished", "job_completed"]
    assert [event["id"] for event in events] == sorted(event["id"] for event in events)
    assert [event["kind"] for event in server.events(job_id, last_event_id=events[4]["id"])] == kinds[5:]
    job = server.client.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "completed" and job["error"] is None and job["files"] == []
    summary = server.client.get(job["summary"]).json()
    assert summary["outputs"]["sum"]["value"] == 7.0 and summary["outputs"]["text"]["value"] == "z!"


def test_a_tiny_render_is_downloadable_as_a_png(server: Server) -> None:
    job = server.wait(server.submit(template="tiny_sd", params={"seed": 3})["id"])
    assert job["status"] == "completed", job["error"]
    assert len(job["files"]) == 2  # the decoded IMAGE output and SaveImage's file (with its text chunks)
    response = server.client.get(job["files"][0])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as image:
        assert (image.size, image.mode) == ((32, 32), "RGB")
    assert server.client.get("/api/files/" + "0" * 64 + ".png").status_code == 404


def test_a_batch_expands_into_jobs_zipped_within_groups_and_multiplied_across(server: Server) -> None:
    ids = server.submit(document=arithmetic(), batch={"groups": [{"a": [1, 2]}, {"word": ["x", "y"]}],
                                                      "repeat": 1})["ids"]
    jobs = [server.wait(job_id) for job_id in ids]
    assert [job["params"] for job in jobs] == [{"a": 1, "word": "x"}, {"a": 1, "word": "y"},
                                               {"a": 2, "word": "x"}, {"a": 2, "word": "y"}]
    assert {job["status"] for job in jobs} == {"completed"} and len({job["batch_id"] for job in jobs}) == 1


def test_invalid_submits_are_refused_with_every_error(server: Server) -> None:
    bad = arithmetic()
    bad["nodes"]["extra"] = {"type": "NoSuchNode", "inputs": {}}
    response = server.client.post("/api/jobs", json={"document": bad, "params": {"a": 1000, "wrd": "x"}})
    assert response.status_code == 422
    codes = sorted(error["code"] for error in response.json()["errors"])
    assert "unknown_node_type" in codes and "unknown_param" in codes and len(codes) >= 3, codes
    batch = server.client.post("/api/jobs", json={"template": "arithmetic",
                                                  "batch": {"groups": [{"a": [1, 500, "x"]}]}})
    assert batch.status_code == 422 and len(batch.json()["errors"]) == 2
    unknown = server.client.post("/api/jobs", json={"template": "arithmetik"})
    assert unknown.status_code == 422 and "arithmetic" in unknown.json()["message"]
    shape = server.client.post("/api/jobs", json={"template": "arithmetic", "options": {"device": "cuda"}})
    assert shape.status_code == 422 and shape.json()["errors"][0]["input"] == "body.options.device"


@pytest.mark.parametrize("path", ["/etc/passwd", "../../../../etc/hostname", "uploads/../../token"])
def test_inline_documents_cannot_read_outside_the_input_roots(server: Server, path: str) -> None:
    document = {"graphflow": 1, "nodes": {"load": {"type": "LoadImage", "inputs": {"path": path}}},
                "outputs": {"image": "load.image"}}
    response = server.client.post("/api/jobs", json={"document": document})
    assert response.status_code == 422
    assert [error["code"] for error in response.json()["errors"]] in (["path_outside_root"], ["file_not_found"])
    saving = tiny_sd()
    saving["nodes"]["save"]["inputs"]["prefix"] = "../../../escaped"
    [escape] = server.client.post("/api/jobs", json={"document": saving}).json()["errors"]
    assert (escape["code"], escape["node"], escape["input"]) == ("path_outside_root", "save", "prefix")
    nested = {"graphflow": 1, "nodes": {"t": {"template": "/etc/passwd"}}, "outputs": {}}
    assert server.client.post("/api/jobs", json={"document": nested}).json()["errors"][0]["code"] \
        == "path_outside_root"


def test_an_uploaded_image_is_sniffed_stored_by_content_and_usable_by_a_job(server: Server) -> None:
    response = server.client.post("/api/images", files={"file": ("../../evil.txt", png(20, 10), "text/plain")})
    assert response.status_code == 201, response.text
    upload = response.json()
    assert upload["format"] == "PNG" and (upload["width"], upload["height"]) == (20, 10)
    assert Path(upload["path"]).parent == (server.data / "uploads").resolve() and "evil" not in upload["name"]
    document = {"graphflow": 1, "nodes": {"load": {"type": "LoadImage", "inputs": {"path": upload["path"]}}},
                "outputs": {"image": "load.image"}}
    job = server.wait(server.submit(document=document)["id"])
    assert job["status"] == "completed" and len(job["files"]) == 1


def test_bad_uploads_and_big_bodies_are_refused(server: Server) -> None:
    not_image = server.client.post("/api/images", files={"file": ("photo.png", b"<?php echo 1; ?>", "image/png")})
    assert not_image.status_code == 415
    too_many_pixels = server.client.post("/api/images", files={"file": ("big.png", png(1000, 1000), "image/png")})
    assert too_many_pixels.status_code == 413 and "pixels" in too_many_pixels.json()["detail"]
    truncated = server.client.post("/api/images", files={"file": ("t.png", png(20, 20)[:60], "image/png")})
    assert truncated.status_code == 422
    huge = server.client.post("/api/jobs", content=b"{" + b" " * (5 << 20) + b"}",
                              headers={"Content-Type": "application/json"})
    assert huge.status_code == 413


def test_cancel_a_pending_job_at_once_and_a_running_one_at_its_next_step(server: Server) -> None:
    slow = server.submit(template="tiny_sd", params={"steps": 100}, priority=10)["id"]
    server.wait_for_event(slow, "node_progress")
    waiting = server.submit(template="arithmetic")["id"]
    assert server.client.post(f"/api/jobs/{waiting}/cancel").json()["status"] == "cancelled"
    assert server.client.delete(f"/api/jobs/{slow}").status_code == 409  # running: cancel first
    assert server.client.post(f"/api/jobs/{slow}/cancel").json()["cancel_requested"] is True
    job = server.wait(slow, timeout=10)
    assert job["status"] == "cancelled"
    steps = [event["step"] for event in server.events(slow) if event["kind"] == "node_progress"]
    assert max(steps) < 100
    assert server.client.post(f"/api/jobs/{slow}/cancel").status_code == 409
    after = server.wait(server.submit(template="arithmetic", params={"a": 2})["id"])
    assert after["status"] == "completed"
    assert server.client.delete(f"/api/jobs/{waiting}").status_code == 200
    assert server.client.get(f"/api/jobs/{waiting}").status_code == 404


def test_no_auth_is_refused_on_a_host_other_than_loopback(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "graphflow.cli", "serve", "--no-auth", "--host", "0.0.0.0",
                           "--data", str(tmp_path / "d"), "--graphs", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--no-auth is refused" in done.stderr
    assert not (tmp_path / "d" / "token").exists()
