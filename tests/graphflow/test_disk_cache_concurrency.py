"""Many threads and processes on one cache directory, writers killed mid-write: readers see whole entries or none."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time
from pathlib import Path

import torch

from graphflow.disk_cache import DiskCache

KEYS = [f"{index:02x}" * 16 for index in range(12)]
FORK = multiprocessing.get_context("fork")  # the children share the parent's imports: no second torch start-up


def value_of(key: str) -> dict[str, object]:
    """The one result ever stored under `key`: its size differs per key, so a mixed-up entry shows."""
    index = KEYS.index(key)
    return {"x": torch.full((index + 1, 100), float(index), dtype=torch.bfloat16 if index % 2 else torch.float32),
            "key": key}


def exercise(directory: Path, seed: int, rounds: int, cache: DiskCache | None = None) -> list[str]:
    """Random gets and puts; the problems seen (an exception, a partial or foreign entry)."""
    chooser = random.Random(seed)
    cache = cache or DiskCache(directory, max_bytes=4000)  # room for a few entries: eviction runs all the time
    problems = []
    for _ in range(rounds):
        key = chooser.choice(KEYS)
        try:
            if chooser.random() < 0.5:
                cache.put(key, value_of(key))
                continue
            got = cache.get(key)
            wanted = value_of(key)
            if got is not None and (got["key"] != key or got["x"].dtype != wanted["x"].dtype
                                    or not torch.equal(got["x"], wanted["x"])):
                problems.append(f"{key}: a wrong entry")
        except Exception as error:
            problems.append(f"{key}: {error!r}")
    return problems


def assert_whole(directory: Path) -> None:
    cache = DiskCache(directory)
    for key in KEYS:
        got = cache.get(key)
        assert got is None or (got["key"] == key and torch.equal(got["x"], value_of(key)["x"]))


def test_threads_sharing_a_cache_and_threads_with_their_own_never_fail(tmp_path: Path) -> None:
    shared = DiskCache(tmp_path, max_bytes=4000)
    results: list[list[str]] = []

    def work(seed: int) -> None:
        results.append(exercise(tmp_path, seed, 150, shared if seed % 2 else None))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [[]] * 8
    assert_whole(tmp_path)


def test_processes_sharing_a_directory_never_fail(tmp_path: Path) -> None:
    with FORK.Pool(4) as pool:
        results = pool.starmap(exercise, [(tmp_path, seed, 150) for seed in range(4)])
    assert results == [[]] * 4
    assert_whole(tmp_path)
    cache = DiskCache(tmp_path, max_bytes=4000)
    cache.put(KEYS[0], value_of(KEYS[0]))  # a fresh walk: the bound holds again once the writers are done
    assert sum(path.stat().st_size for path in tmp_path.rglob("*") if path.is_file()) <= 4000


def write_forever(directory: Path) -> None:
    cache = DiskCache(directory)
    for round_ in range(10**9):
        key = KEYS[round_ % len(KEYS)]
        cache.put(key, {"x": torch.full((1 << 20,), float(round_)), "key": key})


def test_writers_killed_mid_write_leave_whole_entries_and_no_lasting_temporary_files(tmp_path: Path) -> None:
    chooser = random.Random(0)
    for _ in range(3):
        writer = FORK.Process(target=write_forever, args=(tmp_path,))
        writer.start()
        time.sleep(chooser.uniform(0.1, 0.4))
        assert writer.pid is not None
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
    cache = DiskCache(tmp_path)
    for key in KEYS:
        got = cache.get(key)
        assert got is None or (got["key"] == key and got["x"].shape == (1 << 20,) and torch.equal(
            got["x"], got["x"][:1].expand(1 << 20)))
    cache.put("ff" * 16, {"x": 1})  # the first put walks the directory, removing what the dead writers left
    assert list(tmp_path.rglob("*.tmp")) == []
