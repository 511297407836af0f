"""Memory stays bounded over many jobs: a long loop of small jobs (distinct params, so every result is new) through
the real queue and worker, on an Engine with a small memory cache. The cache's byte count never passes its limit,
its entries stay few, each model loads once, and the database and results folder hold only what the jobs stored.
RSS before and after is printed for the record (run with -s), not asserted: it depends on the allocator."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from graphflow.service.config import ServiceConfig
from graphflow.service.queue import COMPLETED, JobQueue, NewJob
from graphflow.service.results import ResultStore
from graphflow.service.worker import WorkerPool
from tests.service.graphs import arithmetic, tiny_sd

ARITHMETIC_JOBS = 1000
SD_JOBS = 6  # about a second each on a loaded 2-core machine
CACHE_BYTES = 64 << 10


def rss_mb() -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def test_a_long_loop_of_small_jobs_keeps_the_caches_within_their_limits(tmp_path: Path, tiny_models: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHFLOW_TINY_MODELS", str(tiny_models))
    config = ServiceConfig(data=tmp_path / "data", graphs=tmp_path, devices=("cpu",), cache_bytes=CACHE_BYTES)
    config.prepare()
    queue = JobQueue(config.database)
    pool = WorkerPool(config, queue, ResultStore(config.results), lambda name: None, registry=None)
    [worker] = pool.workers  # not started: the test runs the worker's loop body itself, one job at a time
    cache = worker.engine.cache
    peak = {"bytes": 0, "entries": 0}
    put = cache.put

    def watched_put(key: str, outputs: dict[str, object]) -> None:
        put(key, outputs)
        peak["bytes"], peak["entries"] = max(peak["bytes"], cache.bytes), max(peak["entries"], len(cache))

    monkeypatch.setattr(cache, "put", watched_put)

    def run_all(jobs: list[NewJob]) -> list[str]:
        ids = queue.submit(jobs)
        while (job := queue.claim(worker.name, worker.held_models(), device=worker.device)) is not None:
            worker.run_job(job)
        return ids

    warm = run_all([NewJob(tiny_sd(steps=1), {"seed": 10_000}, {}, models=("tiny:sd15",)),
             NewJob(arithmetic(), {"a": -1.0}, {})])  # warm up: imports, the model, first allocations
    before = rss_mb()
    ids = run_all([NewJob(arithmetic(), {"a": round(-99 + index * 0.1, 1), "word": "xyz"[index % 3]}, {})
                   for index in range(ARITHMETIC_JOBS)])
    ids += run_all([NewJob(tiny_sd(steps=1), {"seed": seed}, {}, models=("tiny:sd15",))
                    for seed in range(SD_JOBS)])
    after = rss_mb()
    print(f"\nRSS over {len(ids)} jobs ({ARITHMETIC_JOBS} arithmetic, {SD_JOBS} tiny SD 32 px 1 step, memory cache "
          f"{CACHE_BYTES >> 10} KiB): {before:.1f} MB before, {after:.1f} MB after ({after - before:+.1f} MB); "
          f"cache peak {peak['bytes']} B in {peak['entries']} entries, {cache.stats.evictions} evictions")

    jobs = [queue.get(job_id) for job_id in warm + ids]
    assert all(job is not None and job.status == COMPLETED for job in jobs), [j.error for j in jobs if j]
    # the memory cache: never past its byte limit, so only a few results held, the rest evicted
    assert 0 < peak["bytes"] <= CACHE_BYTES and cache.bytes <= CACHE_BYTES
    assert peak["entries"] < ARITHMETIC_JOBS and cache.stats.evictions > ARITHMETIC_JOBS
    assert len(worker.engine._compiled) <= 64 and len(worker.store._summaries) <= 4096
    # warm models: the tiny checkpoint loaded once across every SD job
    loads = worker.engine.models.loads
    assert loads and set(loads.values()) == {1}, loads
    # the database holds the jobs and their events, nothing else
    with sqlite3.connect(config.database) as db:
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == len(ids) + 2
        per_job = db.execute("SELECT job_id, COUNT(*) FROM events GROUP BY job_id").fetchall()
    assert len(per_job) == len(ids) + 2 and max(count for _, count in per_job) <= 40
    # the results folder: exactly the summaries and images the jobs reference, no strays or temporary files
    referenced = set()
    for job in jobs:
        assert job is not None and job.result is not None
        referenced |= {job.result, *(worker.store.summary(job.result) or {}).get("files", [])}
    stored = {path.name for path in config.results.iterdir()}
    assert stored == referenced, stored ^ referenced
    assert len(list(config.outputs.iterdir())) == SD_JOBS + 1  # one SaveImage file per SD job
