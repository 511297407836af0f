"""The disk cache's bound: least recently used first, temporary files counted, no directory walk on every put."""

from __future__ import annotations

import fcntl
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from graphflow.disk_cache import DiskCache

ENTRY = {"x": torch.zeros(250)}  # about 1.4 kB on disk


def key(index: int) -> str:
    return f"{index:032x}"


def entry_size(tmp_path: Path) -> int:
    probe = DiskCache(tmp_path / "probe")
    probe.put(key(0), ENTRY)
    return probe.path(key(0)).stat().st_size


def stored(cache: DiskCache) -> list[str]:
    return sorted(path.stem for path in cache.directory.rglob("*.safetensors"))


def test_a_dead_writers_temporary_file_is_removed_and_a_live_ones_is_kept_and_counted(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "cache", max_bytes=3 * entry_size(tmp_path))
    shard = cache.path(key(1)).parent
    shard.mkdir(parents=True)
    dead = shard / f".{key(1)}.safetensors.abcd1234.tmp"
    live = shard / f".{key(2)}.safetensors.wxyz5678.tmp"
    dead.write_bytes(b"x" * 10_000)
    live.write_bytes(b"y" * 2 * entry_size(tmp_path))
    with open(live, "rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)  # what atomic_write holds while it writes
        for index in (3, 4):
            assert cache.put(key(index), ENTRY)
        assert not dead.exists() and live.exists()
        assert stored(cache) == [key(4)]  # the live file's bytes count: room for one entry beside it
    not_ours = shard / ".notes.txt.abcd1234.tmp"
    not_ours.write_text("a user's file in our directory")
    DiskCache(cache.directory).put(key(5), ENTRY)  # a new cache walks the directory on its first put
    assert not_ours.exists()


def test_format_1_entries_are_never_read_and_are_evicted_like_any_other(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "cache", max_bytes=3 * entry_size(tmp_path))
    old = cache.directory / "00" / f"{key(1)}.npz"
    old.parent.mkdir(parents=True)
    buffer = io.BytesIO()
    np.savez(buffer, manifest=np.frombuffer(b'{"format": 1, "outputs": {"dict": {"x": 1}}}', dtype=np.uint8))
    old.write_bytes(buffer.getvalue())
    os.utime(old, (1, 1))  # last used long ago
    assert cache.get(key(1)) is None
    for index in (2, 3, 4):
        cache.put(key(index), ENTRY)
    assert not old.exists() and stored(cache) == [key(2), key(3), key(4)]


def test_an_entry_another_process_read_since_the_walk_is_kept(tmp_path: Path) -> None:
    size = entry_size(tmp_path)
    cache = DiskCache(tmp_path / "cache", max_bytes=3 * size)
    for index in (1, 2, 3):
        cache.put(key(index), ENTRY)
        os.utime(cache.path(key(index)), ns=(index * 10**9, index * 10**9))
    other = DiskCache(tmp_path / "cache")  # another process, as far as `cache` can tell
    assert other.get(key(1)) is not None
    cache.put(key(4), ENTRY)
    assert stored(cache) == [key(1), key(3), key(4)]


def test_entries_evicted_by_another_process_meanwhile_are_no_error(tmp_path: Path) -> None:
    size = entry_size(tmp_path)
    cache = DiskCache(tmp_path / "cache", max_bytes=4 * size)
    for index in range(1, 5):
        cache.put(key(index), ENTRY)
    for index in (1, 2):
        cache.path(key(index)).unlink()  # the other process got there first
    cache.max_bytes = 2 * size
    assert cache.put(key(5), ENTRY)
    assert stored(cache) == [key(4), key(5)]


def test_puts_do_not_walk_the_directory_each_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries, size = 120, entry_size(tmp_path)
    cache = DiskCache(tmp_path / "cache", max_bytes=40 * size)
    walks = []
    walk = DiskCache._scan
    monkeypatch.setattr(DiskCache, "_scan", lambda self: (walks.append(1), walk(self)))
    monkeypatch.setattr("graphflow.disk_cache._RESCAN_PUTS", 50)
    for index in range(entries):  # fills the cache, then keeps it full: every later put evicts one entry
        assert cache.put(key(index), ENTRY)
    assert len(walks) == 1 + entries // 50  # the first put's, then one every 50 puts
    assert stored(cache) == [key(index) for index in range(entries - 40, entries)]
