"""Attack: one disk cache directory used at once by several Engines in threads and by another process, on real
graphs with the tiny models; every result equals a run without any disk cache, and a fresh Engine is served exactly
from what they left."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from graphflow import Engine
from graphflow.events import NodeStarted
from graphflow.models import ModelManager

ROOT = Path(__file__).resolve().parents[2]
CANNY = str(ROOT / "graphs" / "controlnet_canny.json")
SD = {"checkpoint": "tiny:sd15", "controlnet": "tiny:controlnet-canny", "steps": 2, "width": 64, "height": 48}
JOBS = [{**SD, "seed": 0, "prefix": "a"}, {**SD, "seed": 1, "low": 50, "prefix": "b"},
        {**SD, "seed": 0, "prompt": "another room", "prefix": "c"}]
CHILD = """
import sys
from graphflow import Engine
from graphflow.models import ModelManager
root, cache, out, graph = sys.argv[1:5]
engine = Engine(input_dirs=[root], output_dir=out, disk_cache=cache, models=ModelManager())
engine.run(graph, {"checkpoint": "tiny:sd15", "controlnet": "tiny:controlnet-canny", "steps": 2, "width": 64,
                   "height": 48, "seed": 0})
"""


def outputs_equal(got: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> bool:
    return got.keys() == wanted.keys() and all(torch.equal(got[name], wanted[name]) for name in wanted)


def test_engines_in_threads_and_a_process_sharing_one_disk_cache_get_exact_results(
        tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHFLOW_TINY_MODELS", str(tiny_models))
    cache = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT), str(cache), str(tmp_path / "child"), CANNY],
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    models = ModelManager()
    reference = Engine(input_dirs=[ROOT], output_dir=tmp_path / "reference", models=models)
    expected = [reference.run(CANNY, params).outputs for params in JOBS]
    engines = [Engine(input_dirs=[ROOT], output_dir=tmp_path / f"out{index}", disk_cache=cache, models=models)
               for index in range(3)]
    order = [0, 1, 2, 0, 1, 2]

    def work(number: int) -> tuple[int, Any]:
        return order[number], engines[number % 3].run(CANNY, JOBS[order[number]])

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(work, range(len(order))))
    assert all(outputs_equal(result.outputs, expected[index]) for index, result in results)
    output, _ = child.communicate(timeout=120)
    assert child.returncode == 0, output.decode(errors="replace")[-3000:]
    assert not list(cache.rglob("*.tmp"))

    fresh = Engine(input_dirs=[ROOT], output_dir=tmp_path / "fresh", disk_cache=cache, models=ModelManager())
    started: list[str] = []
    for index, params in enumerate(JOBS):
        result = fresh.run(CANNY, params, on_event=lambda event: isinstance(event, NodeStarted)
                           and started.append(event.type))
        assert outputs_equal(result.outputs, expected[index])
    assert not {"Sampler", "TextEncode", "Canny"} & set(started)  # each served whole from the shared directory
