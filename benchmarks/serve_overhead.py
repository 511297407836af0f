"""What `graphflow serve` costs over calling Engine.run in-process, for a trivial graph whose nodes are cached.

Starts a real server subprocess on a free loopback port and measures: jobs per second end to end (a batch of
--jobs identical jobs, from the POST to the last job completed), one job's latency (submit to its job_started and
job_completed events on its SSE stream), and --clients concurrent SSE clients on one job (all of them see every
event, in one order). Beside them, the same trivial graph run with Engine.run in a loop, and the ratio.

    python benchmarks/serve_overhead.py [--jobs 500] [--clients 20]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

TRIVIAL = {"graphflow": 1, "name": "trivial",
           "params": {"a": {"type": "FLOAT", "default": 1.0}},
           "nodes": {"sum": {"type": "Math", "inputs": {"a": {"param": "a"}, "b": 2, "op": "add"}},
                     "text": {"type": "JoinText", "inputs": {"texts": ["a", "b"], "separator": ""}}},
           "outputs": {"sum": "sum.result", "text": "text.text"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--latency-samples", type=int, default=30)
    args = parser.parse_args()
    in_process = engine_jobs_per_second(args.jobs)
    with tempfile.TemporaryDirectory() as folder:
        process, client = start_server(Path(folder))
        try:
            client.post("/api/jobs", json={"template": "trivial"}).raise_for_status()  # warm: the nodes get cached
            served = served_jobs_per_second(client, args.jobs)
            started, completed = latencies(client, args.latency_samples)
            fan_out = concurrent_clients(client, args.clients)
        finally:
            process.terminate()
            process.wait(30)
    print(f"jobs per second, trivial cached graph: served {served:,.0f}/s, Engine.run {in_process:,.0f}/s "
          f"(served / in-process = {served / in_process:.3f})")
    print(f"submit -> job_started event: median {started * 1e3:.1f} ms; submit -> job_completed event: median "
          f"{completed * 1e3:.1f} ms (Engine.run: {1e3 / in_process:.2f} ms per job)")
    print(f"{args.clients} SSE clients on one job: every client saw all {fan_out[0]} events in one order, the last "
          f"one {fan_out[1] * 1e3:.0f} ms after the submit")


def engine_jobs_per_second(jobs: int) -> float:
    from graphflow.engine import Engine

    engine = Engine()
    engine.run(TRIVIAL)
    started = time.perf_counter()
    for _ in range(jobs):
        engine.run(TRIVIAL)
    return jobs / (time.perf_counter() - started)


def start_server(folder: Path) -> tuple[subprocess.Popen[bytes], httpx.Client]:
    graphs = folder / "graphs"
    graphs.mkdir()
    (graphs / "trivial.json").write_text(json.dumps(TRIVIAL))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "graphflow.cli", "serve", "--port", str(port), "--data",
                                str(folder / "data"), "--graphs", str(graphs)], stdout=subprocess.DEVNULL,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    token = (folder / "data" / "token").read_text().strip()
    return process, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)


def served_jobs_per_second(client: httpx.Client, jobs: int) -> float:
    started = time.perf_counter()
    ids = client.post("/api/jobs", json={"template": "trivial", "batch": {"repeat": jobs}}).json()["ids"]
    final = stream(client, f"/api/jobs/{ids[-1]}/events")[-1]
    assert final["kind"] == "job_completed", final
    return jobs / (time.perf_counter() - started)


def latencies(client: httpx.Client, samples: int) -> tuple[float, float]:
    to_start, to_end = [], []
    for _ in range(samples):
        submitted = time.perf_counter()
        job_id = client.post("/api/jobs", json={"template": "trivial"}).json()["id"]
        with client.stream("GET", f"/api/jobs/{job_id}/events") as events:
            for line in events.iter_lines():
                if not line.startswith("data: "):
                    continue
                kind = json.loads(line[6:])["kind"]
                if kind == "job_started":
                    to_start.append(time.perf_counter() - submitted)
                elif kind == "job_completed":
                    to_end.append(time.perf_counter() - submitted)
    return statistics.median(to_start), statistics.median(to_end)


def concurrent_clients(client: httpx.Client, clients: int) -> tuple[int, float]:
    submitted = time.perf_counter()
    job_id = client.post("/api/jobs", json={"template": "trivial", "params": {"a": 41.5}}).json()["id"]
    seen: list[list[int]] = []
    finished: list[float] = []
    lock = threading.Lock()

    def listen() -> None:
        ids = [event["id"] for event in stream(client, f"/api/jobs/{job_id}/events")]
        with lock:
            seen.append(ids)
            finished.append(time.perf_counter() - submitted)

    threads = [threading.Thread(target=listen) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == clients and all(ids == seen[0] for ids in seen), "clients saw different events"
    return len(seen[0]), max(finished)


def stream(client: httpx.Client, path: str) -> list[dict[str, Any]]:
    events = []
    with client.stream("GET", path) as response:
        event_id = None
        for line in response.iter_lines():
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: "):
                events.append({"id": event_id, **json.loads(line[6:])})
    return events


if __name__ == "__main__":
    main()
