"""Hostile files in a disk cache: each is a miss that is removed and recomputed, and nothing outside is touched."""

from __future__ import annotations

import io
import json
import os
import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from graphflow.disk_cache import DiskCache
from graphflow.disk_format import FORMAT, _digest

KEY, OTHER = "ab" * 16, "ab" + "cd" * 15  # one shard
VALUE = {"image": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4), "meta": {"n": 3, "names": ["a", "b"]}}


def forged(manifest: Any, tensors: dict[str, torch.Tensor], key: str = KEY) -> bytes:
    """An entry in the cache's own format whose digest is right: only a deliberate forger writes one."""
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    return safetensors.torch.save(tensors, {"format": FORMAT, "key": key, "manifest": text,
                                            "digest": _digest(key, text, tensors)})


def leaf(kind: str = "tensor", name: str = "0", dtype: str = "float32", shape: Any = (3,)) -> dict[str, Any]:
    return {kind: name, "dtype": dtype, "shape": list(shape)}


def outputs(**values: Any) -> dict[str, Any]:
    return {"dict": values}


def nested(depth: int) -> str:
    return '{"dict": {"x": ' + '{"list": [' * depth + "]}" * depth + "}}"


def numpy_pickle() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"format": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def torch_pickle() -> bytes:
    buffer = io.BytesIO()
    torch.save({"x": torch.ones(3)}, buffer)
    return buffer.getvalue()


def npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, manifest=np.frombuffer(b'{"format": 1, "outputs": {"dict": {}}}', dtype=np.uint8))
    return buffer.getvalue()


def header(text: str) -> bytes:
    """A safetensors file of nothing but this header."""
    return len(text).to_bytes(8, "little") + text.encode()


ONES = {"0": torch.ones(3)}
HOSTILE_BYTES: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "zeros": lambda: b"\0" * 4096,
    "a pickle": lambda: pickle.dumps({"image": torch.ones(3)}),
    "a numpy object array": numpy_pickle,
    "a torch.save zip": torch_pickle,
    "a format-1 .npz entry": npz,
    "safetensors without metadata": lambda: safetensors.torch.save(ONES),
    "a wrong digest": lambda: safetensors.torch.save(ONES, {"format": FORMAT, "key": KEY, "digest": "0" * 64,
                                                            "manifest": json.dumps(outputs(image=leaf()))}),
    "format 1": lambda: safetensors.torch.save(ONES, {"format": "1", "key": KEY}),
    "another key's entry": lambda: forged(outputs(image=leaf()), ONES, key=OTHER),
    "a manifest nested 100,000 deep": lambda: forged(nested(100_000), {}),
    "a manifest nested 150 deep": lambda: forged(nested(150), {}),
    "a wrong dtype": lambda: forged(outputs(image=leaf(dtype="float16")), ONES),
    "a wrong shape": lambda: forged(outputs(image=leaf(shape=(1, 3))), ONES),
    "bfloat16 as numpy": lambda: forged(outputs(image=leaf("ndarray", dtype="bfloat16")),
                                        {"0": torch.ones(3, dtype=torch.bfloat16)}),
    "a missing tensor": lambda: forged(outputs(image=leaf(name="1")), ONES),
    "a tensor named twice": lambda: forged(outputs(a=leaf(), b=leaf()), ONES),
    "an unnamed tensor": lambda: forged(outputs(), ONES),
    "an unknown tag": lambda: forged(outputs(image={"object": "os.system"}), {}),
    "a bare JSON object": lambda: forged({"image": 1}, {}),
    "a top-level list": lambda: forged({"list": [1]}, {}),
    "a manifest that is not JSON": lambda: forged("{not json", {}),
    "a header claiming 4 TB": lambda: header(json.dumps({"0": {"dtype": "F32", "shape": [1 << 40],
                                                                           "data_offsets": [0, 4 << 40]}})),
    "a header longer than the file": lambda: (1 << 62).to_bytes(8, "little") + b"{}",
    "a header nested 100,000 deep": lambda: header("[" * 100_000 + "]" * 100_000),
}


@pytest.fixture
def cache(tmp_path: Path) -> DiskCache:
    return DiskCache(tmp_path / "cache")


def assert_miss_then_heals(cache: DiskCache, key: str = KEY) -> None:
    assert cache.get(key) is None
    assert not os.path.lexists(cache.path(key))
    assert cache.put(key, VALUE)
    healed = cache.get(key)
    assert healed is not None and torch.equal(healed["image"], VALUE["image"]) and healed["meta"] == VALUE["meta"]


@pytest.mark.parametrize("make", HOSTILE_BYTES.values(), ids=HOSTILE_BYTES.keys())
def test_a_hostile_file_is_a_miss_that_is_removed(cache: DiskCache, make: Callable[[], bytes]) -> None:
    cache.path(KEY).parent.mkdir(parents=True)
    cache.path(KEY).write_bytes(make())
    assert_miss_then_heals(cache)


def test_a_valid_entry_copied_under_another_keys_name_is_a_miss(cache: DiskCache) -> None:
    assert cache.put(KEY, VALUE)
    cache.path(OTHER).write_bytes(cache.path(KEY).read_bytes())
    assert_miss_then_heals(cache, OTHER)


def test_every_truncation_is_a_miss(cache: DiskCache) -> None:
    assert cache.put(KEY, VALUE)
    data = cache.path(KEY).read_bytes()
    for length in range(len(data)):
        cache.path(KEY).write_bytes(data[:length])
        assert cache.get(KEY) is None, length
        assert not cache.path(KEY).exists()


def test_every_flipped_bit_is_a_miss(cache: DiskCache) -> None:
    assert cache.put(KEY, VALUE)
    data = cache.path(KEY).read_bytes()
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 1 << (position % 8)
        cache.path(KEY).write_bytes(bytes(damaged))
        assert cache.get(KEY) is None, position
        assert not cache.path(KEY).exists()


def test_a_directory_where_the_entry_belongs_is_removed(cache: DiskCache) -> None:
    (cache.path(KEY) / "inner").mkdir(parents=True)
    (cache.path(KEY) / "inner" / "file").write_text("x")
    assert_miss_then_heals(cache)


def test_a_directory_with_a_symlink_out_is_removed_without_following_it(cache: DiskCache, tmp_path: Path) -> None:
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "precious.txt").write_text("keep me")
    cache.path(KEY).mkdir(parents=True)
    (cache.path(KEY) / "out").symlink_to(tmp_path / "user", target_is_directory=True)
    assert not cache.put(KEY, {"model": object()})  # nothing to store: nothing is removed either
    assert_miss_then_heals(cache)
    assert (tmp_path / "user" / "precious.txt").read_text() == "keep me"


def test_a_fifo_where_the_entry_belongs_neither_blocks_nor_stays(cache: DiskCache) -> None:
    cache.path(KEY).parent.mkdir(parents=True)
    os.mkfifo(cache.path(KEY))
    reader = threading.Thread(target=assert_miss_then_heals, args=(cache,), daemon=True)
    reader.start()
    reader.join(timeout=20)
    assert not reader.is_alive()
    assert cache.path(KEY).is_file()


def test_an_entry_symlinked_to_a_users_file_is_never_read_written_or_deleted(cache: DiskCache, tmp_path: Path) -> None:
    user = tmp_path / "user.safetensors"  # a valid entry for KEY even: it must still not be served from there
    other = DiskCache(tmp_path / "other")
    other.put(KEY, {"image": torch.zeros(3)})
    user.write_bytes(other.path(KEY).read_bytes())
    before = user.read_bytes(), user.stat().st_mtime_ns
    cache.path(KEY).parent.mkdir(parents=True)
    cache.path(KEY).symlink_to(user)
    assert_miss_then_heals(cache)
    cache.path(KEY).unlink()
    cache.path(KEY).symlink_to(user)
    assert cache.put(KEY, VALUE) and not cache.path(KEY).is_symlink()  # the link is replaced, not written through
    cache.path(OTHER).symlink_to(user)
    cache.max_bytes = 1
    cache.put("cd" * 16, {"x": 1})  # evicts all it can: the link is not an entry, and its target is never touched
    assert (user.read_bytes(), user.stat().st_mtime_ns) == before


def test_an_entry_hard_linked_to_a_users_file_loses_only_its_name(cache: DiskCache, tmp_path: Path) -> None:
    user = tmp_path / "user.bin"
    user.write_bytes(b"the user's data" * 100)
    cache.path(KEY).parent.mkdir(parents=True)
    os.link(user, cache.path(KEY))
    assert_miss_then_heals(cache)
    os.link(user, cache.path(OTHER))
    assert cache.put(OTHER, VALUE)
    assert user.read_bytes() == b"the user's data" * 100 and user.stat().st_nlink == 1


@pytest.mark.parametrize("target", ["loop", "dangling", "directory"])
def test_other_symlinks_where_the_entry_belongs_are_removed(cache: DiskCache, tmp_path: Path, target: str) -> None:
    (tmp_path / "directory").mkdir()
    cache.path(KEY).parent.mkdir(parents=True)
    cache.path(KEY).symlink_to({"loop": cache.path(KEY), "dangling": tmp_path / "nothing",
                                "directory": tmp_path / "directory"}[target])
    assert_miss_then_heals(cache)
    assert (tmp_path / "directory").is_dir()


def test_a_shard_symlinked_elsewhere_is_never_read_written_or_evicted(cache: DiskCache, tmp_path: Path) -> None:
    elsewhere = DiskCache(tmp_path / "elsewhere")
    for key in (KEY, OTHER):
        elsewhere.put(key, {"image": torch.zeros(3)})
    outside = {path: path.read_bytes() for path in (tmp_path / "elsewhere").rglob("*")  if path.is_file()}
    cache.directory.mkdir()
    (cache.directory / KEY[:2]).symlink_to(tmp_path / "elsewhere" / KEY[:2], target_is_directory=True)
    assert cache.get(KEY) is None  # never read through the link
    assert cache.put(KEY, VALUE) and not (cache.directory / KEY[:2]).is_symlink()
    (cache.directory / KEY[:2]).rename(cache.directory / "old")
    (cache.directory / KEY[:2]).symlink_to(tmp_path / "elsewhere" / KEY[:2], target_is_directory=True)
    cache.max_bytes = 1
    cache.put("cd" * 16, {"x": 1})  # walks and evicts everything it can: never through the link
    assert {path: path.read_bytes() for path in (tmp_path / "elsewhere").rglob("*") if path.is_file()} == outside


def test_a_shard_that_is_a_file_or_a_loop_is_replaced(cache: DiskCache) -> None:
    cache.directory.mkdir()
    (cache.directory / KEY[:2]).write_text("not a directory")
    assert_miss_then_heals(cache)
    (cache.directory / "cd").symlink_to(cache.directory / "cd")
    assert_miss_then_heals(cache, "cd" * 16)


def test_the_cache_directory_itself_may_be_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    cache = DiskCache(tmp_path / "link")
    assert cache.put(KEY, VALUE) and cache.get(KEY) is not None
    assert (tmp_path / "real" / KEY[:2] / f"{KEY}.safetensors").is_file()


def test_a_file_larger_than_the_bound_is_not_read(cache: DiskCache) -> None:
    cache.max_bytes = 1 << 20
    cache.path(KEY).parent.mkdir(parents=True)
    with open(cache.path(KEY), "wb") as file:
        file.truncate(64 << 30)  # sparse: 64 GB that would all be read into memory
    assert_miss_then_heals(cache)


def test_a_result_larger_than_the_bound_is_not_stored(cache: DiskCache) -> None:
    cache.max_bytes = 1000
    assert not cache.put(KEY, {"x": torch.zeros(1000)})
    assert not cache.path(KEY).exists()
