"""One Engine, many threads: results equal sequential runs, shared work is done once, accounting stays exact."""

from __future__ import annotations

import copy
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from graphflow import Cancelled, CancelToken, Engine, NodeExecutionError, default_registry
from graphflow.cache import MemoryCache, estimate_bytes
from graphflow.context import RunContext
from graphflow.node import Input, Node, Output
from graphflow.registry import NodeRegistry
from graphflow.types import FLOAT

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"


class Slow(Node):
    """Sleeps, then doubles its value; counts its runs, and fails while `failures` is above zero."""

    runs: ClassVar[int] = 0
    failures: ClassVar[int] = 0
    lock = threading.Lock()
    inputs = (Input("value", FLOAT, default=1.0), Input("seconds", FLOAT, default=0.2))
    outputs = (Output("value", FLOAT),)

    def run(self, ctx: RunContext, value: float, seconds: float) -> dict[str, Any]:
        with Slow.lock:
            Slow.runs += 1
            failing = Slow.failures > 0
            Slow.failures -= 1
        time.sleep(seconds)
        if failing:
            raise RuntimeError("failed on purpose")
        return {"value": value * 2}


@pytest.fixture
def registry() -> NodeRegistry:
    Slow.runs, Slow.failures = 0, 0
    registry = default_registry()
    registry.register(Slow)
    return registry


def slow_graph(value: float = 1.0, seconds: float = 0.2) -> dict[str, Any]:
    return {"graphflow": 1, "nodes": {"s": {"type": "Slow", "inputs": {"value": value, "seconds": seconds}},
                                      "m": {"type": "Math", "inputs": {"a": {"from": "s.value"}, "b": 1.0}}},
            "outputs": {"r": "m.result"}}


def in_threads(count: int, work: Any) -> list[Any]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(work, range(count)))


def test_the_memory_cache_stays_exact_under_contention() -> None:
    cache = MemoryCache(max_bytes=40_000)
    keys = [f"k{index}" for index in range(40)]
    failures: list[BaseException] = []

    def hammer(seed: int) -> None:
        chooser = random.Random(seed)
        try:
            for _ in range(3000):
                key = chooser.choice(keys)
                action = chooser.random()
                if action < 0.5:
                    cache.put(key, {"x": torch.zeros(chooser.randint(1, 400))})
                elif action < 0.9:
                    cache.get(key)
                else:
                    cache.discard(key)
        except BaseException as error:  # any failure in a thread is the test's failure
            failures.append(error)

    in_threads(8, hammer)
    assert failures == []
    held = [cache.get(key) for key in keys]
    assert cache.bytes == sum(estimate_bytes(value) for value in held if value is not None) <= cache.max_bytes


def test_threads_sharing_one_engine_get_what_sequential_runs_get(tmp_path: Path) -> None:
    shutil.copytree(GRAPHS, tmp_path / "graphs")
    graph = tmp_path / "graphs" / "canny_blend.json"
    settings = [{"low": low, "high": high, "prefix": f"p{low}_{high}"} for low in (20, 60, 100) for high in (150, 220)]

    def engine(out: str) -> Engine:
        return Engine(input_dirs=[tmp_path], output_dir=tmp_path / out)

    sequential = engine("seq")
    expected = [sequential.run(graph, values).outputs["image"] for values in settings]
    shared = engine("threads")
    jobs = [index % len(settings) for index in range(4 * len(settings))]
    results = in_threads(len(jobs), lambda job: (jobs[job], shared.run(graph, settings[jobs[job]]).outputs["image"]))
    for index, image in results:
        assert torch.equal(image, expected[index])
    written = sorted(path.name for path in (tmp_path / "threads").rglob("*.png"))
    assert written == sorted(f"{values['prefix']}_00000.png" for values in settings)  # each distinct job once


def test_many_threads_needing_one_uncached_node_compute_it_once(registry: NodeRegistry, tmp_path: Path) -> None:
    engine = Engine(registry, input_dirs=[tmp_path])
    results = in_threads(8, lambda _: engine.run(copy.deepcopy(slow_graph())).outputs["r"])
    assert results == [3.0] * 8 and Slow.runs == 1


def test_when_the_computing_run_fails_a_waiting_run_computes_it_itself(registry: NodeRegistry, tmp_path: Path) -> None:
    engine = Engine(registry, input_dirs=[tmp_path])
    Slow.failures = 1

    def attempt(_: int) -> str:
        try:
            return str(engine.run(slow_graph()).outputs["r"])
        except NodeExecutionError as error:
            return type(error.cause).__name__

    assert sorted(in_threads(2, attempt)) == ["3.0", "RuntimeError"] and Slow.runs == 2


def test_a_run_waiting_for_another_can_be_cancelled(registry: NodeRegistry, tmp_path: Path) -> None:
    engine = Engine(registry, input_dirs=[tmp_path])
    computing = threading.Thread(target=engine.run, args=(slow_graph(seconds=1.0),))
    computing.start()
    time.sleep(0.2)
    token = CancelToken()
    threading.Timer(0.2, token.cancel).start()
    started = time.perf_counter()
    with pytest.raises(Cancelled):
        engine.run(slow_graph(seconds=1.0), cancel=token)
    assert time.perf_counter() - started < 0.6  # it stopped waiting; the other run goes on
    computing.join()
    assert Slow.runs == 1 and engine.run(slow_graph(seconds=1.0)).ran == []


def test_threads_compiling_edits_of_one_document_each_get_their_own(registry: NodeRegistry, tmp_path: Path) -> None:
    engine = Engine(registry, input_dirs=[tmp_path])
    values = [float(index) for index in range(12)]
    results = in_threads(12, lambda index: engine.run(slow_graph(values[index], 0.0)).outputs["r"])
    assert results == [value * 2 + 1 for value in values]
