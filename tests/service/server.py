"""A real `graphflow serve` subprocess on a free loopback port, and an httpx client for it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.service.graphs import arithmetic, tiny_sd

REPO = Path(__file__).resolve().parents[2]


def checkout_env(**extra: str) -> dict[str, str]:
    """The environment for a `python -m graphflow.cli` subprocess that runs this checkout's graphflow, whatever
    checkout the installed (editable) package points at."""
    path = os.pathsep.join(part for part in (str(REPO), os.environ.get("PYTHONPATH", "")) if part)
    return {**os.environ, "PYTHONPATH": path, **extra}


def write_templates(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "arithmetic.json").write_text(json.dumps(arithmetic()))
    (folder / "tiny_sd.json").write_text(json.dumps(tiny_sd()))
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """`graphflow serve` with DATA and --graphs under `root`; `client` carries the token."""

    def __init__(self, root: Path, tiny_models: Path, *extra: str) -> None:
        self.root = root
        self.data = root / "data"
        self.graphs = write_templates(root / "graphs")
        self.tiny_models = tiny_models
        self.extra = extra
        self.process: subprocess.Popen[str] | None = None
        self.output = ""

    def start(self, startup_s: float = 60) -> Server:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = checkout_env(GRAPHFLOW_TINY_MODELS=str(self.tiny_models), HF_HUB_OFFLINE="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "graphflow.cli", "serve", "--port", str(self.port), "--data", str(self.data),
             "--graphs", str(self.graphs), *self.extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env, cwd=self.root)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited: {self.process.stdout.read()}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{self.url}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError(f"the server did not start in {startup_s:.0f} s")
        token_file = self.data / "token"  # none with --no-auth
        self.token = token_file.read_text().strip() if token_file.is_file() else None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        return self

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        assert self.process is not None and self.process.poll() is None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.output += self.process.stdout.read()  # type: ignore[union-attr]
        self.client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.output += self.process.stdout.read()  # type: ignore[union-attr]
            self.client.close()

    def submit(self, **body: Any) -> Any:
        response = self.client.post("/api/jobs", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """The job once it is finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/api/jobs/{job_id}").json()
            if job["status"] in ("completed", "failed", "cancelled"):
                return job  # type: ignore[no-any-return]
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not finish in {timeout} s")

    def events(self, job_id: str, last_event_id: int | None = None) -> list[dict[str, Any]]:
        """The job's whole event stream (it ends with the job's final event), as (id, data) dicts."""
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
        return read_sse(self.client, f"/api/jobs/{job_id}/events", headers)

    def wait_for_event(self, job_id: str, kind: str) -> None:
        with self.client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["kind"] == kind:
                    return
        raise AssertionError(f"job {job_id} ended without a {kind} event")


def read_sse(client: httpx.Client, path: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    with client.stream("GET", path, headers=headers) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("id: "):
                current["id"] = int(line[4:])
            elif line.startswith("data: "):
                current.update(json.loads(line[6:]))
            elif not line and current:
                events.append(current)
                current = {}
    return events
