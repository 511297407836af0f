"""The on-disk cache tier: results of opted-in nodes survive the process, exactly, and nothing is pickled."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import resource
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from graphflow import Engine
from graphflow.disk_cache import DiskCache

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"


def test_round_trips_tensors_arrays_and_json_values(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    outputs = {
        "image": torch.rand(1, 4, 5, 3),
        "half": torch.rand(2, 3).to(torch.bfloat16),
        "bytes": torch.arange(6, dtype=torch.uint8),
        "array": np.arange(4, dtype=np.int16),
        "meta": {"sizes": [1, 2.5, None, True], "name": "x"},
    }
    assert cache.put("ab" * 16, outputs)
    loaded = cache.get("ab" * 16)
    assert loaded is not None
    assert torch.equal(loaded["image"], outputs["image"])
    assert loaded["half"].dtype == torch.bfloat16 and torch.equal(loaded["half"], outputs["half"])
    assert loaded["bytes"].dtype == torch.uint8 and torch.equal(loaded["bytes"], outputs["bytes"])
    assert loaded["array"].dtype == np.int16 and np.array_equal(loaded["array"], outputs["array"])
    assert loaded["meta"] == outputs["meta"]


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int64, torch.bool, torch.float64,
          torch.int32, torch.int16, torch.int8, torch.complex64, torch.uint16, torch.uint32, torch.uint64]


def same(loaded: Any, stored: Any) -> bool:
    """Equal values of equal types, dtypes and shapes all the way down."""
    if type(loaded) is not type(stored):
        return False
    if isinstance(stored, torch.Tensor):
        return loaded.dtype == stored.dtype and loaded.shape == stored.shape and torch.equal(loaded, stored)
    if isinstance(stored, (np.ndarray, np.generic)):
        return loaded.dtype == stored.dtype and loaded.shape == stored.shape and np.array_equal(loaded, stored)
    if isinstance(stored, dict):
        return list(loaded) == list(stored) and all(same(loaded[name], stored[name]) for name in stored)
    if isinstance(stored, (list, tuple)):
        return len(loaded) == len(stored) and all(same(a, b) for a, b in zip(loaded, stored, strict=True))
    return loaded == stored or (loaded != loaded and stored != stored)  # NaN is itself


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_tensor_dtype_comes_back_as_itself(tmp_path: Path, dtype: torch.dtype) -> None:
    cache = DiskCache(tmp_path)
    values = (torch.rand(2, 3, 5) * 300 - 100).to(dtype) if dtype != torch.bool else torch.rand(2, 3, 5) > 0.5
    outputs = {"value": values, "scalar": values[0, 0, 0].clone(), "empty": values[:0]}
    assert cache.put("ab" * 16, outputs)
    assert same(cache.get("ab" * 16), outputs)


@pytest.mark.parametrize("dtype", [np.int16, np.float64, np.float32, np.float16, np.uint8, np.int64, np.bool_,
                                   np.uint16, np.complex64], ids=lambda dtype: np.dtype(dtype).name)
def test_numpy_arrays_and_scalars_come_back_as_numpy_of_their_dtype(tmp_path: Path, dtype: Any) -> None:
    cache = DiskCache(tmp_path)
    array = (np.arange(12).reshape(3, 4) % 5).astype(dtype)
    outputs = {"array": array, "columns": array[:, 1], "scalar": array[1, 1], "empty": np.zeros((0, 4), dtype)}
    assert cache.put("ab" * 16, outputs)
    assert same(cache.get("ab" * 16), outputs)


def test_views_shared_storage_and_non_contiguous_tensors_store_as_what_they_show(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    array = np.arange(12.0)
    outputs = {"base": base, "transposed": base.t(), "row": base[1], "strided": base[::2, ::3], "again": base,
               "expanded": torch.ones(3).expand(4, 3), "grad": torch.ones(2, requires_grad=True) * 2,
               "channels_last": torch.rand(1, 3, 4, 4).to(memory_format=torch.channels_last),
               "conjugate": torch.tensor([1 + 2j], dtype=torch.complex64).conj(), "empties": [torch.zeros(0)] * 2,
               "array": array, "reversed": array[::-1], "read_only": np.frombuffer(b"\1\2\3", dtype=np.uint8),
               "array_again": array[:]}
    assert cache.put("ab" * 16, outputs)
    loaded = cache.get("ab" * 16)
    expected = {name: value.detach().resolve_conj() if isinstance(value, torch.Tensor) else value
                for name, value in outputs.items()}
    assert loaded is not None and same(loaded, expected)
    assert cache.put("cd" * 16, {"row": torch.zeros(1000, 1000)[7]})
    assert cache.path("cd" * 16).stat().st_size < 8000  # the row, not the 4 MB it is a view into


def test_nested_structures_and_json_scalars_come_back_exactly(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    outputs = {"conditioning": {"family": "sdxl", "embeds": torch.rand(1, 4, 8).half(), "pooled": None,
                                "default_negative": {"embeds": torch.zeros(1, 4, 8).half()}},
               "controls": [{"scale": 0.9, "window": (0.0, 1.0), "image": torch.rand(1, 8, 8, 3)}, []],
               "numbers": [0, -1, 2**70, 1e-310, -0.0, float("inf"), float("nan"), True, False],
               "text": "ünïcode \u2603 \ud800", "": {"dict": "not a tag", "list": []}}
    assert cache.put("ab" * 16, outputs)
    assert same(cache.get("ab" * 16), outputs)


def test_bfloat16_is_stored_natively(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    assert cache.put("ab" * 16, {"x": torch.rand(1000).bfloat16()})
    assert cache.path("ab" * 16).stat().st_size < 2000 + 1024  # two bytes a value, not float32's four


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("outputs", [{"model": object()}, {"objects": np.array([object()], dtype=object)},
                                     {"text": np.array(["a"])}, {"swapped": np.arange(3, dtype=">i4")},
                                     {"sparse": torch.eye(3).to_sparse()}, {1: "int key"}, {"set": {1}},
                                     {"subclass": torch.nn.Parameter(torch.ones(1))}, {"deep": nested(150)}],
                         ids=lambda outputs: next(iter(outputs)))
def test_values_with_no_exact_form_are_refused(tmp_path: Path, outputs: dict[Any, Any]) -> None:
    cache = DiskCache(tmp_path)
    assert not cache.put("ab" * 16, outputs)
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []


@pytest.mark.parametrize("key", ["../../../escape", "AB" * 16, "ab" * 15, "ab" * 17, "ab" * 16 + "\n",
                                 "ab/" * 8 + "ab" * 4, "zz" * 16, "", 12, None], ids=repr)
def test_anything_but_32_lowercase_hex_digits_is_refused_as_a_key(tmp_path: Path, key: Any) -> None:
    cache = DiskCache(tmp_path / "cache")
    assert not cache.put(key, {"x": 1})
    assert cache.get(key) is None
    assert list(tmp_path.rglob("*")) == []


def put_on_a_full_disk(directory: Path) -> tuple[bool, Any, bool]:
    """In a child process: puts once writes past 4 kB fail with EFBIG, as they would on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    cache = DiskCache(directory)
    return cache.put("ab" * 16, {"x": torch.zeros(1000)}), cache.get("ab" * 16), cache.put("cd" * 16, {"x": 1})


def test_a_full_disk_fails_the_put_not_the_caller(tmp_path: Path) -> None:
    with multiprocessing.get_context("fork").Pool(1) as child:  # fork: no second torch start-up
        assert child.apply(put_on_a_full_disk, (tmp_path,)) == (False, None, True)  # the small entry still fits
    assert not (tmp_path / "ab").exists() or list((tmp_path / "ab").iterdir()) == []


def test_an_unusable_directory_fails_puts_and_misses_gets(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file, not a directory")
    cache = DiskCache(tmp_path / "file" / "cache")
    assert not cache.put("ab" * 16, {"x": torch.zeros(3)})
    assert cache.get("ab" * 16) is None
    if os.geteuid() != 0:  # root writes through permissions
        (tmp_path / "read-only").mkdir(mode=0o500)
        assert not DiskCache(tmp_path / "read-only").put("ab" * 16, {"x": 1})


def test_no_exception_escapes_get_or_put(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = DiskCache(tmp_path)
    assert cache.put("ab" * 16, {"x": torch.ones(2)})
    for error in (RuntimeError("boom"), MemoryError(), RecursionError(), OSError(28, "No space left on device")):
        def fail(*_: Any, error: BaseException = error) -> None:
            raise error

        monkeypatch.setattr("graphflow.disk_cache.decode_entry", fail)
        monkeypatch.setattr("graphflow.disk_cache.atomic_write", fail)
        assert cache.get("ab" * 16) is None
        assert not cache.put("cd" * 16, {"x": torch.ones(2)})
        monkeypatch.undo()


def test_values_that_would_need_pickle_are_not_stored(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    assert not cache.put("cd" * 16, {"model": object()})
    assert not cache.put("cd" * 16, {"objects": np.array([object()], dtype=object)})
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []
    assert cache.get("cd" * 16) is None


def test_a_corrupt_or_pickled_file_is_a_miss_and_is_removed(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    cache.put("ef" * 16, {"x": 1})
    path = cache.path("ef" * 16)
    path.write_bytes(b"not a safetensors file")
    assert cache.get("ef" * 16) is None and not path.exists()
    path.write_bytes(pickle.dumps({"x": 1}))
    assert cache.get("ef" * 16) is None and not path.exists()


def test_least_recently_used_files_go_first_once_over_budget(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=10**9)
    for index, key in enumerate(("11" * 16, "22" * 16, "33" * 16)):
        cache.put(key, {"data": np.zeros(1000)})
        stamp = 1_000_000 + index
        os.utime(cache.path(key), (stamp, stamp))
    assert cache.get("11" * 16) is not None  # touched: now the most recent
    one_file = cache.path("11" * 16).stat().st_size
    cache.max_bytes = 2 * one_file
    cache.put("44" * 16, {"data": np.zeros(1000)})
    assert sorted(path.stem for path in tmp_path.rglob("*.safetensors")) == ["11" * 16, "44" * 16]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    shutil.copytree(GRAPHS, tmp_path / "graphs")
    return tmp_path


def test_a_new_engine_reuses_opted_in_results_from_disk(workspace: Path) -> None:
    graph = workspace / "graphs" / "canny_blend.json"

    def engine() -> Engine:
        return Engine(input_dirs=[workspace], output_dir=workspace / "out", disk_cache=workspace / "cache")

    first = engine().run(graph)
    second = engine().run(graph)  # a fresh engine stands for a new process: its memory cache is empty
    assert "edges" in first.ran and "edges" not in second.ran
    assert second.ran == ["photo", "region", "blend", "save"] and second.cached == ["edges"]
    assert torch.equal(first.outputs["image"], second.outputs["image"])
    without_disk = Engine(input_dirs=[workspace], output_dir=workspace / "out").run(graph)
    assert "edges" in without_disk.ran


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "directory", "symlink"])
def test_a_damaged_entry_is_recomputed_and_the_run_succeeds(workspace: Path, damage: str) -> None:
    graph = workspace / "graphs" / "canny_blend.json"

    def engine() -> Engine:
        return Engine(input_dirs=[workspace], output_dir=workspace / "out", disk_cache=workspace / "cache")

    first = engine().run(graph)
    [entry] = (workspace / "cache").rglob("*.safetensors")
    data, edges = entry.read_bytes(), DiskCache(workspace / "cache").get(entry.stem)
    entry.unlink()
    if damage == "directory":
        entry.mkdir()
    elif damage == "symlink":
        (workspace / "elsewhere").write_bytes(data)
        entry.symlink_to(workspace / "elsewhere")
    else:
        entry.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x00" * len(data)}[damage])
    second = engine().run(graph)
    assert "edges" in second.ran and torch.equal(second.outputs["image"], first.outputs["image"])
    assert entry.is_file() and not entry.is_symlink()  # healed: stored again, as a file of its own
    healed = DiskCache(workspace / "cache").get(entry.stem)
    assert edges is not None and healed is not None and torch.equal(healed["image"], edges["image"])
    assert (damage != "symlink") or (workspace / "elsewhere").read_bytes() == data
    assert engine().run(graph).cached == ["edges"]
