"""The on-disk cache tier: results of opted-in nodes survive the process, and nothing is pickled."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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


def test_values_that_would_need_pickle_are_not_stored(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    assert not cache.put("cd" * 16, {"model": object()})
    assert not cache.put("cd" * 16, {"objects": np.array([object()], dtype=object)})
    assert list(tmp_path.rglob("*.npz")) == []
    assert cache.get("cd" * 16) is None


def test_a_corrupt_or_pickled_file_is_a_miss_and_is_removed(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    cache.put("ef" * 16, {"x": 1})
    path = next(tmp_path.rglob("*.npz"))
    path.write_bytes(b"not a zip file")
    assert cache.get("ef" * 16) is None and not path.exists()
    np.savez(path.with_suffix(""), manifest=np.array([{"format": 1}], dtype=object))  # needs pickle to read
    assert cache.get("ef" * 16) is None and not path.exists()


def test_least_recently_used_files_go_first_once_over_budget(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=10**9)
    for index, key in enumerate(("11" * 16, "22" * 16, "33" * 16)):
        cache.put(key, {"data": np.zeros(1000)})
        stamp = 1_000_000 + index
        os.utime(next(tmp_path.rglob(f"{key}.npz")), (stamp, stamp))
    assert cache.get("11" * 16) is not None  # touched: now the most recent
    one_file = next(tmp_path.rglob("*.npz")).stat().st_size
    cache.max_bytes = 2 * one_file
    cache.put("44" * 16, {"data": np.zeros(1000)})
    assert sorted(path.stem for path in tmp_path.rglob("*.npz")) == ["11" * 16, "44" * 16]


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
