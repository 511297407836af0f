"""Attacks on one Engine under threads with counting plugin nodes: duplicated work, leaked flights, cancellation,
failures, a tiny memory cache, and what RunResult.ran / cached report."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import pytest

from graphflow import Cancelled, CancelToken, Engine, NodeExecutionError, default_registry
from graphflow.cache import estimate_bytes
from graphflow.context import RunContext
from graphflow.events import NodeProgress
from graphflow.node import Input, Node, Output
from graphflow.registry import NodeRegistry
from graphflow.types import FLOAT, INT

TIMEOUT = 20.0  # no join may take longer: a hang is a failure, never a stuck suite


class Count(Node):
    """value * 2 after `seconds`; counts its executions per value; fails for values listed in `failing`."""

    runs: ClassVar[Counter[float]] = Counter()
    failing: ClassVar[set[float]] = set()
    lock = threading.Lock()
    inputs = (Input("value", FLOAT, default=1.0), Input("seconds", FLOAT, default=0.0))
    outputs = (Output("value", FLOAT),)

    def run(self, ctx: RunContext, value: float, seconds: float) -> dict[str, Any]:
        with Count.lock:
            Count.runs[value] += 1
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ctx.progress(0, 1)  # a cancellation point, as a sampler step is
            time.sleep(0.005)
        if value in Count.failing:
            raise RuntimeError(f"{value} fails on purpose")
        return {"value": value * 2}


class Gate(Node):
    """Blocks until `Gate.opened` is set (after signalling `Gate.entered`): a node that is still running."""

    entered = threading.Event()
    opened = threading.Event()
    inputs = (Input("tag", INT, default=0),)
    outputs = (Output("value", FLOAT),)

    def run(self, ctx: RunContext, tag: int) -> dict[str, Any]:
        Gate.entered.set()
        assert Gate.opened.wait(TIMEOUT)
        return {"value": float(tag)}


@pytest.fixture
def registry() -> NodeRegistry:
    Count.runs.clear()
    Count.failing = set()
    Gate.entered.clear()
    Gate.opened.clear()
    registry = default_registry()
    registry.register(Count)
    registry.register(Gate)
    return registry


def count(value: float, seconds: float = 0.0) -> dict[str, Any]:
    return {"type": "Count", "inputs": {"value": value, "seconds": seconds}}


def document(nodes: dict[str, Any], outputs: dict[str, str]) -> dict[str, Any]:
    return {"graphflow": 1, "nodes": nodes, "outputs": outputs}


def joined(thread: threading.Thread) -> None:
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "the run hangs"


def test_a_node_another_run_finished_after_this_run_was_planned_is_not_computed_again(
        registry: NodeRegistry) -> None:
    engine = Engine(registry)
    # run A: a node still running (Gate), then k; run B: k alone, started and finished while A waits at the gate
    slow = document({"gate": {"type": "Gate", "inputs": {"tag": 1}}, "k": count(5.0)},
                    {"gate": "gate.value", "k": "k.value"})
    results: dict[str, Any] = {}
    first = threading.Thread(target=lambda: results.setdefault("a", engine.run(slow)))
    first.start()
    assert Gate.entered.wait(TIMEOUT)  # A is planned (k missing from the cache) and executing
    assert engine.run(document({"k": count(5.0)}, {"k": "k.value"})).ran == ["k"]
    Gate.opened.set()
    joined(first)
    assert results["a"].outputs["k"] == 10.0
    assert Count.runs[5.0] == 1, "k was computed twice"
    assert results["a"].ran == ["gate"] and results["a"].cached == ["k"]


def test_mixed_overlapping_graphs_from_many_threads_compute_each_key_once_and_report_exactly(
        registry: NodeRegistry) -> None:
    """Graphs sharing sub-graphs under different ids, each run while the others are in flight."""
    engine = Engine(registry)

    def chain(values: list[float], prefix: str) -> dict[str, Any]:
        nodes: dict[str, Any] = {}
        for index, value in enumerate(values):
            nodes[f"{prefix}{index}"] = count(value, 0.05)
        nodes[f"{prefix}sum"] = {"type": "Math", "inputs": {"a": {"from": f"{prefix}0.value"},
                                                             "b": {"from": f"{prefix}{len(values) - 1}.value"}}}
        return document(nodes, {"r": f"{prefix}sum.result"})

    graphs = [chain([1.0, 2.0, 3.0], "a"), chain([2.0, 3.0, 4.0], "b"), chain([1.0, 4.0], "c"),
              chain([3.0, 1.0], "d")]
    expected = [2.0 + 6.0, 4.0 + 8.0, 2.0 + 8.0, 6.0 + 2.0]
    jobs = [index % len(graphs) for index in range(24)]
    random.Random(3).shuffle(jobs)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: (job, engine.run(graphs[job])), jobs))
    for job, result in results:
        assert result.outputs["r"] == expected[job]
        planned = set(graphs[job]["nodes"])
        assert not set(result.ran) & set(result.cached)
        assert len(result.ran) == len(set(result.ran)) and len(result.cached) == len(set(result.cached))
        assert set(result.ran) | set(result.cached) <= planned and f"{chr(97 + job)}sum" in result.ran + result.cached
        assert set(result.timings) == set(result.ran)
    assert set(Count.runs.values()) == {1}  # values 1..4: each computed once however many runs needed it
    assert engine._flights == {}


def test_a_run_cancelled_mid_node_hands_its_key_to_the_waiting_run_and_leaves_no_flight(
        registry: NodeRegistry) -> None:
    engine = Engine(registry)
    graph = document({"k": count(7.0, 1.0), "m": {"type": "Math", "inputs": {"a": {"from": "k.value"}, "b": 1.0}}},
                     {"r": "m.result"})
    token = CancelToken()
    started = threading.Event()
    outcome: dict[str, Any] = {}

    def cancelled_run() -> None:
        try:
            engine.run(graph, cancel=token, on_event=lambda event: isinstance(event, NodeProgress) and started.set())
        except Cancelled as error:
            outcome["a"] = error

    first = threading.Thread(target=cancelled_run)
    first.start()
    assert started.wait(TIMEOUT)
    second = threading.Thread(target=lambda: outcome.setdefault("b", engine.run(graph)))
    second.start()
    deadline = time.monotonic() + TIMEOUT
    while not any(flight.signal for flight in list(engine._flights.values())):  # B waits for A's flight
        assert time.monotonic() < deadline
        time.sleep(0.01)
    threading.Timer(0.05, token.cancel).start()  # from a third thread
    joined(first)
    joined(second)
    assert isinstance(outcome["a"], Cancelled)
    assert outcome["b"].outputs["r"] == 15.0 and outcome["b"].ran == ["k", "m"]
    assert Count.runs[7.0] == 2 and engine._flights == {}
    assert engine.run(graph).ran == []


def test_failing_nodes_in_some_threads_leave_the_others_correct_and_no_flight_behind(
        registry: NodeRegistry) -> None:
    engine = Engine(registry)
    Count.failing = {3.0}
    good = document({"x": count(1.0, 0.05), "y": count(2.0, 0.05)}, {"x": "x.value", "y": "y.value"})
    bad = document({"x": count(1.0, 0.05), "z": count(3.0, 0.05)}, {"x": "x.value", "z": "z.value"})

    def attempt(index: int) -> Any:
        try:
            return engine.run(good if index % 2 else bad).outputs
        except NodeExecutionError as error:
            return (error.node, type(error.cause).__name__)

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(attempt, range(12)))
    assert outcomes[1::2] == [{"x": 2.0, "y": 4.0}] * 6
    assert outcomes[0::2] == [("z", "RuntimeError")] * 6
    assert Count.runs[1.0] == 1 and Count.runs[2.0] == 1 and Count.runs[3.0] >= 1
    assert engine._flights == {}
    Count.failing = set()
    resumed = engine.run(bad)
    assert resumed.ran == ["z"] and resumed.cached == ["x"]


def test_a_memory_cache_too_small_for_results_stays_exact_under_threads(registry: NodeRegistry) -> None:
    engine = Engine(registry, cache_bytes=200)  # room for about two small results
    graphs = [document({"a": count(float(value)), "m": {"type": "Math", "inputs": {"a": {"from": "a.value"},
                                                                               "b": float(value)}}},
                       {"r": "m.result"}) for value in range(6)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda index: engine.run(graphs[index % 6]).outputs["r"], range(60)))
    assert results == [3.0 * (index % 6) for index in range(60)]
    held = [value for value, _ in engine.cache._entries.values()]
    assert engine.cache.bytes == sum(estimate_bytes(value) for value in held) <= engine.cache.max_bytes
    assert engine._flights == {}


def test_results_holding_tensors_inside_objects_count_against_the_memory_bound(tiny_models: Path) -> None:
    import dataclasses

    import torch

    root = Path(__file__).resolve().parents[2]
    engine = Engine(input_dirs=[root, tiny_models], cache_bytes=100_000)  # less than one 128x96 image

    def control(low: int) -> dict[str, Any]:
        return document({
            "photo": {"type": "LoadImage", "inputs": {"path": "graphs/assets/room.png"}},
            "edges": {"type": "Canny", "inputs": {"image": {"from": "photo.image"}, "low": low, "high": 200}},
            "cn": {"type": "ControlNetLoader", "inputs": {"model": str(tiny_models / "controlnet-canny")}},
            "ctl": {"type": "ControlApply", "inputs": {"controlnet": {"from": "cn.controlnet"},
                                                       "image": {"from": "edges.image"}}}}, {"c": "ctl.control"})

    for low in range(10, 60, 5):
        engine.run(control(low))

    def tensors(value: Any, found: dict[int, int]) -> None:
        if isinstance(value, torch.Tensor):
            found[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                tensors(item, found)
        elif isinstance(value, (list, tuple)):
            for item in value:
                tensors(item, found)
        elif dataclasses.is_dataclass(value):
            for spec in dataclasses.fields(value):
                tensors(getattr(value, spec.name), found)

    held: dict[int, int] = {}
    for outputs, _ in engine.cache._entries.values():
        tensors(outputs, held)
    assert sum(held.values()) <= engine.cache.max_bytes, f"{sum(held.values())} bytes of tensors held"
