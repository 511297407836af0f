"""The executor: which nodes run, which come from cache, events, cancellation, failures, files and memory."""

import copy
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from PIL import Image

from graphflow import Engine, Graph
from graphflow.cache import estimate_bytes
from graphflow.context import RunContext
from graphflow.engine import RunResult
from graphflow.errors import Cancelled, Code, NodeExecutionError, NodeInputError, ValidationError
from graphflow.events import (
    CancelToken,
    Event,
    NodeCached,
    NodeFailed,
    NodeFinished,
    NodeProgress,
    NodeStarted,
    RunStarted,
)
from graphflow.node import Input, Node, Output
from graphflow.registry import NodeRegistry, default_registry
from graphflow.types import FLOAT, IMAGE, INT
from nodes.primitives import Int

EXECUTIONS: list[str] = []  # ids of the test nodes that executed, in order
IMAGES: dict[str, weakref.ref[torch.Tensor]] = {}  # image node id -> its output image, while it lives
ALIVE: dict[str, set[str]] = {}  # image node id -> the image node ids whose outputs were alive when it ran


class Tally(Node):
    """value + add, recording each execution."""

    inputs = (Input("value", FLOAT, default=0.0), Input("add", FLOAT, default=0.0))
    outputs = (Output("value", FLOAT),)

    def run(self, ctx: RunContext, value: float, add: float) -> dict[str, Any]:
        EXECUTIONS.append(ctx.node)
        return {"value": value + add}


class Echo(Tally):
    """A Tally under another name, so that a second version of it can exist."""


class EchoV2(Echo):
    type_name = "Echo"
    version = "2.0.0"


class Flaky(Node):
    """Passes its value through, or raises while `broken` is set."""

    broken: ClassVar[bool] = False
    inputs = (Input("value", FLOAT, default=0.0),)
    outputs = (Output("value", FLOAT),)

    def run(self, ctx: RunContext, value: float) -> dict[str, Any]:
        EXECUTIONS.append(ctx.node)
        if Flaky.broken:
            raise RuntimeError("the flaky node broke")
        return {"value": value}


class Steps(Node):
    """Reports progress step by step, as a sampler does."""

    inputs = (Input("value", FLOAT, default=0.0), Input("steps", INT, default=3, min=1))
    outputs = (Output("value", FLOAT),)

    def run(self, ctx: RunContext, value: float, steps: int) -> dict[str, Any]:
        EXECUTIONS.append(ctx.node)
        for step in range(1, steps + 1):
            ctx.progress(step, steps)
        return {"value": value}


class Incomplete(Node):
    """Declares two outputs but returns one."""

    outputs = (Output("value", FLOAT), Output("extra", FLOAT))

    def run(self, ctx: RunContext) -> dict[str, Any]:
        return {"value": 1.0}


def produced(ctx: RunContext, image: torch.Tensor) -> dict[str, Any]:
    """Record which image results are still alive now, and track this one."""
    ALIVE[ctx.node] = {node for node, ref in IMAGES.items() if ref() is not None}
    IMAGES[ctx.node] = weakref.ref(image)
    return {"image": image}


class Solid(Node):
    """An 8x8 image of one grey level."""

    inputs = (Input("level", FLOAT, default=0.5),)
    outputs = (Output("image", IMAGE),)

    def run(self, ctx: RunContext, level: float) -> dict[str, Any]:
        return produced(ctx, torch.full((1, 8, 8, 3), level))


class Shade(Node):
    """image * factor."""

    inputs = (Input("image", IMAGE), Input("factor", FLOAT, default=0.5))
    outputs = (Output("image", IMAGE),)

    def run(self, ctx: RunContext, image: torch.Tensor, factor: float) -> dict[str, Any]:
        return produced(ctx, image * factor)


class Mix(Node):
    """The mean of two images."""

    inputs = (Input("a", IMAGE), Input("b", IMAGE))
    outputs = (Output("image", IMAGE),)

    def run(self, ctx: RunContext, a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
        return produced(ctx, (a + b) / 2)


TEST_NODES = (Tally, Echo, Flaky, Steps, Incomplete, Solid, Shade, Mix)


@pytest.fixture(autouse=True)
def fresh_records() -> Iterator[None]:
    EXECUTIONS.clear()
    IMAGES.clear()
    ALIVE.clear()
    Flaky.broken = False
    yield
    Flaky.broken = False


@pytest.fixture
def registry() -> NodeRegistry:
    registry = default_registry()
    for node_type in TEST_NODES:
        registry.register(node_type)
    return registry


@pytest.fixture
def make_engine(registry: NodeRegistry, tmp_path: Path) -> Callable[..., Engine]:
    def make(**options: Any) -> Engine:
        return Engine(options.pop("registry", registry), input_dirs=[tmp_path], output_dir=tmp_path / "out",
                      **options)
    return make


@pytest.fixture
def engine(make_engine: Callable[..., Engine]) -> Engine:
    return make_engine()


def node(type_name: str, **inputs: Any) -> dict[str, Any]:
    return {"type": type_name, "inputs": inputs}


def link(ref: str) -> dict[str, str]:
    return {"from": ref}


def document(nodes: dict[str, Any], outputs: dict[str, str] | None = None) -> dict[str, Any]:
    return {"graphflow": 1, "nodes": nodes, "outputs": outputs or {}}


def arithmetic() -> dict[str, Any]:
    """scaled = (a + 1) * b and other = a + 10, with a = 2 and b = 3."""
    return document({
        "a": node("Int", value=2),
        "b": node("Int", value=3),
        "total": node("Tally", value=link("a.value"), add=1),
        "scaled": node("Math", a=link("total.value"), b=link("b.value"), op="mul"),
        "other": node("Tally", value=link("a.value"), add=10),
    }, {"scaled": "scaled.result", "other": "other.value"})


def chain(length: int) -> dict[str, Any]:
    """t0 -> t1 -> ... Tally nodes, each adding 1; the last one is the output."""
    nodes = {"t0": node("Tally", value=1)}
    for index in range(1, length):
        nodes[f"t{index}"] = node("Tally", value=link(f"t{index - 1}.value"), add=1)
    return document(nodes, {"last": f"t{length - 1}.value"})


def assert_ran(result: RunResult, ran: set[str], cached: set[str]) -> None:
    assert len(result.ran) == len(set(result.ran)), result.ran
    assert len(result.cached) == len(set(result.cached)), result.cached
    assert (set(result.ran), set(result.cached)) == (ran, cached)


def node_events(events: list[Event]) -> list[Event]:
    """The per-node events, without the run-level ones."""
    return [event for event in events if not isinstance(event, RunStarted)]


def write_png(path: Path, level: int) -> None:
    Image.new("RGB", (8, 8), (level, level, level)).save(path)


# Which nodes run


def test_first_run_runs_every_needed_node_and_reports_outputs_timings_and_time(engine: Engine) -> None:
    result = engine.run(arithmetic())

    assert_ran(result, {"a", "b", "total", "scaled", "other"}, set())
    assert result.outputs == {"scaled": 9.0, "other": 12.0}
    assert sorted(EXECUTIONS) == ["other", "total"]
    assert set(result.timings) == set(result.ran)
    assert all(seconds >= 0 for seconds in result.timings.values())
    assert result.seconds >= sum(result.timings.values())
    assert result.files == []


def test_identical_rerun_runs_nothing_and_serves_only_the_targets_from_cache(engine: Engine) -> None:
    engine.run(arithmetic())
    EXECUTIONS.clear()

    result = engine.run(copy.deepcopy(arithmetic()))

    assert result.ran == []
    assert set(result.cached) == {"scaled", "other"}
    assert result.outputs == {"scaled": 9.0, "other": 12.0}
    assert EXECUTIONS == []
    assert result.timings == {}


@pytest.mark.parametrize(("target", "name", "value", "ran", "cached", "outputs"), [
    ("total", "add", 2, {"total", "scaled"}, {"a", "b", "other"}, {"scaled": 12.0, "other": 12.0}),
    ("other", "add", 20, {"other"}, {"a", "scaled"}, {"scaled": 9.0, "other": 22.0}),
    ("scaled", "op", "add", {"scaled"}, {"total", "b", "other"}, {"scaled": 6.0, "other": 12.0}),
    ("a", "value", 5, {"a", "total", "scaled", "other"}, {"b"}, {"scaled": 18.0, "other": 15.0}),
])
def test_changing_one_literal_reruns_exactly_that_node_and_its_descendants(
    engine: Engine, target: str, name: str, value: Any, ran: set[str], cached: set[str], outputs: dict[str, float]
) -> None:
    engine.run(arithmetic())
    changed = arithmetic()
    changed["nodes"][target]["inputs"][name] = value
    EXECUTIONS.clear()

    result = engine.run(changed)

    assert_ran(result, ran, cached)
    assert result.outputs == outputs
    assert sorted(EXECUTIONS) == sorted(ran & {"total", "other"})


def test_reverting_a_change_serves_the_earlier_result_from_cache(engine: Engine) -> None:
    engine.run(arithmetic())
    changed = arithmetic()
    changed["nodes"]["a"]["inputs"]["value"] = 5
    engine.run(changed)
    EXECUTIONS.clear()

    result = engine.run(arithmetic())

    assert_ran(result, set(), {"scaled", "other"})
    assert result.outputs == {"scaled": 9.0, "other": 12.0}


def test_a_node_that_feeds_no_output_never_runs(engine: Engine) -> None:
    graph = arithmetic()
    graph["nodes"]["unused"] = node("Tally", value=link("a.value"), add=5)

    result = engine.run(graph)

    assert "unused" not in result.ran and "unused" not in EXECUTIONS
    assert set(result.ran) == {"a", "b", "total", "scaled", "other"}


def test_requested_outputs_run_only_their_ancestors_and_the_rest_runs_later(engine: Engine) -> None:
    first = engine.run(arithmetic(), outputs=["other"])

    assert_ran(first, {"a", "other"}, set())
    assert first.outputs == {"other": 12.0}
    assert EXECUTIONS == ["other"]

    rest = engine.run(arithmetic())

    assert_ran(rest, {"b", "total", "scaled"}, {"a", "other"})
    assert rest.outputs == {"scaled": 9.0, "other": 12.0}


def test_unknown_requested_output_is_a_validation_error_before_anything_runs(engine: Engine) -> None:
    events: list[Event] = []

    with pytest.raises(ValidationError) as raised:
        engine.run(arithmetic(), outputs=["other", "nope", "missing"], on_event=events.append)

    assert raised.value.codes == [Code.UNKNOWN_OUTPUT, Code.UNKNOWN_OUTPUT]
    assert [error.input for error in raised.value.errors] == ["nope", "missing"]
    assert events == [] and EXECUTIONS == []


def test_execution_order_puts_sources_first_and_keeps_document_order_among_independent_nodes(
    make_engine: Callable[..., Engine],
) -> None:
    def joined(first: str, second: str) -> dict[str, Any]:
        return document({
            "join": node("Math", a=link("y.value"), b=link("x.value")),
            first: node("Tally", value=1 if first == "x" else 2),
            second: node("Tally", value=1 if second == "x" else 2),
        }, {"sum": "join.result"})

    assert make_engine().run(joined("y", "x")).ran == ["y", "x", "join"]
    assert make_engine().run(joined("x", "y")).ran == ["x", "y", "join"]
    assert EXECUTIONS == ["y", "x", "x", "y"]


def test_execution_order_is_the_same_in_every_engine(make_engine: Callable[..., Engine]) -> None:
    orders = [make_engine().run(arithmetic()).ran for _ in range(3)]

    assert orders[0] == orders[1] == orders[2]
    graph = arithmetic()["nodes"]
    position = {node_id: index for index, node_id in enumerate(orders[0])}
    for node_id, entry in graph.items():
        for value in entry["inputs"].values():
            if isinstance(value, dict):
                assert position[value["from"].split(".")[0]] < position[node_id]


def test_a_10000_node_chain_runs_without_recursion_and_reruns_from_cache(engine: Engine) -> None:
    nodes = {"n0": node("Int", value=0)}
    for index in range(1, 10_000):
        source = "n0.value" if index == 1 else f"n{index - 1}.result"
        nodes[f"n{index}"] = node("Math", a=link(source), b=1)
    graph = document(nodes, {"end": "n9999.result"})

    result = engine.run(graph)

    assert result.outputs == {"end": 9999.0}
    assert len(result.ran) == 10_000 and result.ran[0] == "n0" and result.ran[-1] == "n9999"
    again = engine.run(graph)
    assert (again.ran, again.cached) == ([], ["n9999"])


# What the cache key holds


def test_identical_nodes_with_different_ids_execute_once_in_one_run(engine: Engine) -> None:
    graph = document({
        "left": node("Tally", value=1, add=1),
        "right": node("Tally", value=1, add=1),
        "sum": node("Math", a=link("left.value"), b=link("right.value")),
    }, {"sum": "sum.result"})

    result = engine.run(graph)

    assert result.outputs == {"sum": 4.0}
    assert len(EXECUTIONS) == 1
    assert len({"left", "right"} & set(result.ran)) == 1


def test_one_engine_keeps_its_cache_across_graphs_whose_node_ids_differ(engine: Engine) -> None:
    engine.run(arithmetic())
    engine.run(chain(3))
    EXECUTIONS.clear()
    renamed = document({
        "two": node("Int", value=2),
        "three": node("Int", value=3),
        "plus": node("Tally", value=link("two.value"), add=1),
        "times": node("Math", a=link("plus.value"), b=link("three.value"), op="mul"),
        "half": node("Math", a=link("times.result"), b=2, op="div"),
    }, {"half": "half.result"})

    result = engine.run(renamed)

    assert_ran(result, {"half"}, {"times"})
    assert result.outputs == {"half": 4.5}
    assert EXECUTIONS == []
    assert engine.run(arithmetic()).ran == []


def test_builder_graph_and_equal_json_document_share_results(engine: Engine) -> None:
    graph = Graph("tally")
    a = graph.add(Int(value=2), "a")
    total = graph.add(Tally(value=a.value, add=1), "total")
    graph.output("total", total.value)

    built = engine.run(graph)
    written = engine.run(document({"a": node("Int", value=2), "total": node("Tally", value=link("a.value"), add=1)},
                                  {"total": "total.value"}))

    assert built.outputs == written.outputs == {"total": 3.0}
    assert_ran(written, set(), {"total"})


def test_a_new_node_version_does_not_reuse_results_of_the_old_one(make_engine: Callable[..., Engine]) -> None:
    def registry_with(echo: type[Node]) -> NodeRegistry:
        registry = default_registry()
        registry.register(Tally)
        registry.register(echo)
        return registry

    graph = document({"t": node("Tally", value=1), "echo": node("Echo", value=link("t.value"), add=1)},
                     {"echo": "echo.value"})
    old = make_engine(registry=registry_with(Echo))
    old.run(graph)
    new = make_engine(registry=registry_with(EchoV2))
    new.cache = old.cache
    same = make_engine(registry=registry_with(Echo))
    same.cache = old.cache

    assert_ran(new.run(graph), {"echo"}, {"t"})
    assert_ran(same.run(graph), set(), {"echo"})


# Events


def test_events_report_started_and_finished_with_seconds_then_cached_on_rerun(engine: Engine) -> None:
    graph = document({"a": node("Int", value=2), "t": node("Tally", value=link("a.value"), add=1)},
                     {"t": "t.value"})
    events: list[Event] = []

    result = engine.run(graph, on_event=events.append)

    first = node_events(events)
    assert [type(event) for event in first] == [NodeStarted, NodeFinished, NodeStarted, NodeFinished]
    assert first[:1] + first[2:3] == [NodeStarted("a", "Int"), NodeStarted("t", "Tally")]
    finished = [event for event in first if isinstance(event, NodeFinished)]
    assert [(event.node, event.type) for event in finished] == [("a", "Int"), ("t", "Tally")]
    assert {event.node: event.seconds for event in finished} == result.timings

    events.clear()
    engine.run(graph, on_event=events.append)
    assert node_events(events) == [NodeCached("t", "Tally")]

    events.clear()
    graph["nodes"]["t"]["inputs"]["add"] = 2
    engine.run(graph, on_event=events.append)
    assert node_events(events) == [NodeCached("a", "Int"), NodeStarted("t", "Tally"), events[-1]]
    assert isinstance(events[-1], NodeFinished) and events[-1].node == "t"


def test_run_started_event_comes_first_with_the_counts_to_run_and_cached(engine: Engine) -> None:
    engine.run(arithmetic())
    changed = arithmetic()
    changed["nodes"]["total"]["inputs"]["add"] = 2
    events: list[Event] = []

    result = engine.run(changed, on_event=events.append)

    assert events[0] == RunStarted(len(result.ran), len(result.cached)) == RunStarted(2, 3)
    assert not any(isinstance(event, RunStarted) for event in events[1:])


def test_progress_events_count_k_of_n_between_started_and_finished(engine: Engine) -> None:
    graph = document({"s": node("Steps", value=1, steps=4)}, {"s": "s.value"})
    events: list[Event] = []

    engine.run(graph, on_event=events.append)

    steps = node_events(events)
    assert steps[0] == NodeStarted("s", "Steps")
    assert steps[1:5] == [NodeProgress("s", "Steps", step, 4) for step in range(1, 5)]
    assert isinstance(steps[5], NodeFinished) and len(steps) == 6


# Cancellation


def test_a_run_cancelled_before_it_starts_runs_nothing(engine: Engine) -> None:
    token = CancelToken()
    token.cancel()
    events: list[Event] = []

    with pytest.raises(Cancelled):
        engine.run(chain(2), cancel=token, on_event=events.append)

    assert EXECUTIONS == [] and node_events(events) == []
    assert engine.run(chain(2)).ran == ["t0", "t1"]


def test_cancellation_between_nodes_stops_before_the_next_one_and_keeps_finished_ones(engine: Engine) -> None:
    token = CancelToken()

    def cancel_after_first(event: Event) -> None:
        if isinstance(event, NodeFinished) and event.node == "t0":
            token.cancel()

    with pytest.raises(Cancelled):
        engine.run(chain(3), cancel=token, on_event=cancel_after_first)

    assert EXECUTIONS == ["t0"]
    resumed = engine.run(chain(3))
    assert (resumed.ran, resumed.cached) == (["t1", "t2"], ["t0"])
    assert resumed.outputs == {"last": 3.0}


def test_cancellation_during_progress_stops_the_node_and_the_next_run_resumes_there(engine: Engine) -> None:
    graph = document({
        "first": node("Tally", value=1),
        "steps": node("Steps", value=link("first.value"), steps=5),
        "after": node("Tally", value=link("steps.value"), add=1),
    }, {"after": "after.value"})
    token = CancelToken()
    events: list[Event] = []

    def cancel_at_step_two(event: Event) -> None:
        events.append(event)
        if isinstance(event, NodeProgress) and event.step == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        engine.run(graph, cancel=token, on_event=cancel_at_step_two)

    assert [(event.step, event.total) for event in events if isinstance(event, NodeProgress)] == [(1, 5), (2, 5)]
    assert [event.node for event in events if isinstance(event, NodeFinished)] == ["first"]
    assert not any(isinstance(event, NodeFailed) for event in events)
    assert EXECUTIONS == ["first", "steps"]

    resumed = engine.run(graph)
    assert (resumed.ran, resumed.cached) == (["steps", "after"], ["first"])
    assert resumed.outputs == {"after": 2.0}


# Failures


def failing_graph() -> dict[str, Any]:
    return document({
        "side": node("Tally", value=5),
        "source": node("Tally", value=1),
        "middle": node("Tally", value=link("source.value"), add=1),
        "flaky": node("Flaky", value=link("middle.value")),
        "after": node("Tally", value=link("flaky.value"), add=1),
    }, {"after": "after.value", "side": "side.value"})


def test_a_failing_node_reports_its_id_type_and_cause(engine: Engine) -> None:
    Flaky.broken = True
    events: list[Event] = []

    with pytest.raises(NodeExecutionError) as raised:
        engine.run(failing_graph(), on_event=events.append)

    error = raised.value
    assert (error.node, error.node_type) == ("flaky", "Flaky")
    assert isinstance(error.cause, RuntimeError) and error.__cause__ is error.cause
    assert "'flaky'" in str(error) and "Flaky" in str(error) and "the flaky node broke" in str(error)
    assert events[-1] == NodeFailed("flaky", "Flaky", error.cause)
    assert "after" not in EXECUTIONS


def test_after_a_failure_the_next_run_resumes_at_the_failed_node(engine: Engine) -> None:
    Flaky.broken = True
    with pytest.raises(NodeExecutionError):
        engine.run(failing_graph())
    assert sorted(EXECUTIONS) == ["flaky", "middle", "side", "source"]
    Flaky.broken = False
    EXECUTIONS.clear()

    result = engine.run(failing_graph())

    assert_ran(result, {"flaky", "after"}, {"middle", "side"})
    assert EXECUTIONS == ["flaky", "after"]
    assert result.outputs == {"after": 3.0, "side": 5.0}


def test_a_node_input_error_is_reported_as_the_cause_and_fixing_the_literal_resumes(engine: Engine) -> None:
    graph = document({
        "a": node("Tally", value=6),
        "div": node("Math", a=link("a.value"), b=0, op="div"),
    }, {"ratio": "div.result"})

    with pytest.raises(NodeExecutionError) as raised:
        engine.run(graph)

    assert (raised.value.node, raised.value.node_type) == ("div", "Math")
    assert isinstance(raised.value.cause, NodeInputError) and "division by zero" in str(raised.value)
    graph["nodes"]["div"]["inputs"]["b"] = 2
    result = engine.run(graph)
    assert (result.ran, result.cached, result.outputs) == (["div"], ["a"], {"ratio": 3.0})


def test_a_node_that_returns_too_few_outputs_fails_naming_the_missing_one(engine: Engine) -> None:
    events: list[Event] = []

    with pytest.raises(NodeExecutionError) as raised:
        engine.run(document({"bad": node("Incomplete")}, {"v": "bad.value"}), on_event=events.append)

    assert (raised.value.node, raised.value.node_type) == ("bad", "Incomplete")
    assert "extra" in str(raised.value.cause)
    assert isinstance(events[-1], NodeFailed) and events[-1].node == "bad"


# Input and output files


def photo_graph(path: str = "photo.png") -> dict[str, Any]:
    return document({
        "photo": node("LoadImage", path=path),
        "fit": node("ResizePad", image=link("photo.image"), width=8, height=8, interpolation="nearest"),
        "side": node("Tally", value=1),
    }, {"fit": "fit.image", "side": "side.value"})


def test_rewriting_an_input_file_reruns_its_loader_and_descendants(engine: Engine, tmp_path: Path) -> None:
    write_png(tmp_path / "photo.png", 51)
    first = engine.run(photo_graph())
    assert torch.allclose(first.outputs["fit"], torch.full((1, 8, 8, 3), 51 / 255))

    write_png(tmp_path / "photo.png", 204)
    result = engine.run(photo_graph())

    assert_ran(result, {"photo", "fit"}, {"side"})
    assert torch.allclose(result.outputs["fit"], torch.full((1, 8, 8, 3), 204 / 255))


def test_input_files_are_keyed_by_their_bytes_not_their_name_or_time(engine: Engine, tmp_path: Path) -> None:
    write_png(tmp_path / "photo.png", 51)
    data = (tmp_path / "photo.png").read_bytes()
    engine.run(photo_graph())
    write_png(tmp_path / "photo.png", 204)
    engine.run(photo_graph())

    (tmp_path / "photo.png").write_bytes(data)
    restored = engine.run(photo_graph())
    (tmp_path / "copy.png").write_bytes(data)
    copied = engine.run(photo_graph("copy.png"))

    assert_ran(restored, set(), {"fit", "side"})
    assert_ran(copied, set(), {"fit", "side"})
    assert torch.allclose(copied.outputs["fit"], torch.full((1, 8, 8, 3), 51 / 255))


def test_a_file_path_cannot_come_through_a_link(engine: Engine, tmp_path: Path) -> None:
    # A linked path would key the loader by the file's name, so rewriting the file would serve stale pixels.
    graph = photo_graph()
    graph["nodes"] = {"name": node("String", value="photo.png"),
                      **graph["nodes"], "photo": node("LoadImage", path=link("name.value"))}
    write_png(tmp_path / "photo.png", 51)

    with pytest.raises(ValidationError) as caught:
        engine.run(graph)

    [error] = caught.value.errors
    assert (error.code, error.node, error.input) == ("invalid_value", "photo", "path")


def test_a_changed_param_value_reruns_only_the_nodes_that_use_it(engine: Engine) -> None:
    graph = arithmetic()
    graph["params"] = {"offset": {"type": "FLOAT", "default": 10}}
    graph["nodes"]["other"]["inputs"]["add"] = {"param": "offset"}
    assert engine.run(graph).outputs == {"scaled": 9.0, "other": 12.0}

    result = engine.run(graph, {"offset": 20})

    assert_ran(result, {"other"}, {"a", "scaled"})
    assert result.outputs == {"scaled": 9.0, "other": 22.0}
    assert engine.run(graph, {"offset": 10}).ran == []


def test_missing_and_outside_files_are_all_reported_before_any_node_runs(
    registry: NodeRegistry, tmp_path: Path
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    write_png(root / "ok.png", 10)
    write_png(tmp_path / "outside.png", 10)
    engine = Engine(registry, input_dirs=[root], output_dir=tmp_path / "out")
    graph = document({
        "first": node("Tally", value=1),
        "ok": node("LoadImage", path="ok.png"),
        "missing": node("LoadImage", path="missing.png"),
        "escape": node("LoadImage", path="../outside.png"),
        "absolute": node("LoadMask", path=str(tmp_path / "outside.png")),
    }, {"first": "first.value", "ok": "ok.image", "missing": "missing.image", "escape": "escape.image",
        "absolute": "absolute.mask"})
    events: list[Event] = []

    with pytest.raises(ValidationError) as raised:
        engine.run(graph, on_event=events.append)

    assert {(error.node, error.input, error.code) for error in raised.value.errors} == {
        ("missing", "path", Code.FILE_NOT_FOUND),
        ("escape", "path", Code.PATH_OUTSIDE_ROOT),
        ("absolute", "path", Code.PATH_OUTSIDE_ROOT),
    }
    assert events == [] and EXECUTIONS == []


def test_an_input_file_deleted_after_a_run_is_reported_not_served_from_cache(engine: Engine, tmp_path: Path) -> None:
    write_png(tmp_path / "photo.png", 51)
    engine.run(photo_graph())
    (tmp_path / "photo.png").unlink()

    with pytest.raises(ValidationError) as raised:
        engine.run(photo_graph())

    assert [(error.node, error.code) for error in raised.value.errors] == [("photo", Code.FILE_NOT_FOUND)]


def saving_graph() -> dict[str, Any]:
    return document({
        "photo": node("LoadImage", path="photo.png"),
        "save": node("SaveImage", image=link("photo.image"), prefix="shot"),
    }, {"image": "photo.image"})


def test_a_cached_save_whose_file_was_deleted_runs_again(engine: Engine, tmp_path: Path) -> None:
    write_png(tmp_path / "photo.png", 51)
    written = tmp_path / "out" / "shot_00000.png"

    first = engine.run(saving_graph())
    assert_ran(first, {"photo", "save"}, set())
    assert first.files == [written] and written.is_file()

    again = engine.run(saving_graph())
    assert_ran(again, set(), {"photo", "save"})
    assert again.files == []

    written.unlink()
    rewritten = engine.run(saving_graph())
    assert_ran(rewritten, {"save"}, {"photo"})
    assert rewritten.files == [written] and written.is_file()


def test_requesting_named_outputs_leaves_output_nodes_unrun(engine: Engine, tmp_path: Path) -> None:
    write_png(tmp_path / "photo.png", 51)

    result = engine.run(saving_graph(), outputs=["image"])

    assert_ran(result, {"photo"}, set())
    assert result.files == [] and not (tmp_path / "out").exists()


# Memory


def image_graph(**outputs: str) -> dict[str, Any]:
    """src -> s1 -> s2; mix = (src + s2) / 2; final = mix * 0.5."""
    return document({
        "src": node("Solid", level=0.8),
        "s1": node("Shade", image=link("src.image")),
        "s2": node("Shade", image=link("s1.image")),
        "mix": node("Mix", a=link("src.image"), b=link("s2.image")),
        "final": node("Shade", image=link("mix.image")),
    }, {"final": "final.image", **outputs})


def test_intermediates_are_freed_after_their_last_consumer(make_engine: Callable[..., Engine]) -> None:
    result = make_engine(cache_bytes=0).run(image_graph())

    assert ALIVE["s2"] == {"src", "s1"}  # src still waits for mix
    assert ALIVE["mix"] == {"src", "s2"}  # s1 went after s2, its only consumer
    assert ALIVE["final"] == {"mix"}  # src and s2 went after mix
    assert torch.allclose(result.outputs["final"], torch.full((1, 8, 8, 3), 0.25))


def test_intermediates_named_as_outputs_are_kept_to_the_end(make_engine: Callable[..., Engine]) -> None:
    result = make_engine(cache_bytes=0).run(image_graph(src="src.image"))

    assert ALIVE["final"] == {"src", "mix"}
    assert torch.allclose(result.outputs["src"], torch.full((1, 8, 8, 3), 0.8))


def test_the_cache_holds_results_that_the_run_itself_has_freed(engine: Engine) -> None:
    engine.run(image_graph())

    assert ALIVE["final"] == {"src", "s1", "s2", "mix"}


def test_engine_cache_size_is_configurable_in_bytes(make_engine: Callable[..., Engine]) -> None:
    assert make_engine(cache_bytes=12_345).cache.max_bytes == 12_345


def test_a_cache_too_small_for_any_result_still_gives_correct_outputs(make_engine: Callable[..., Engine]) -> None:
    expected = make_engine().run(image_graph()).outputs["final"]
    tiny = make_engine(cache_bytes=1)

    first = tiny.run(image_graph())
    second = tiny.run(image_graph())

    assert torch.equal(first.outputs["final"], expected) and torch.equal(second.outputs["final"], expected)
    assert set(second.ran) == {"src", "s1", "s2", "mix", "final"} and second.cached == []
    assert len(tiny.cache) == 0 and tiny.cache.bytes == 0


def test_a_bounded_cache_keeps_the_most_recently_used_results(make_engine: Callable[..., Engine]) -> None:
    budget = 2 * estimate_bytes({"value": 1.0})  # room for two Tally results
    engine = make_engine(cache_bytes=budget)
    engine.run(chain(4))
    assert (len(engine.cache), engine.cache.stats.evictions) == (2, 2)
    assert engine.cache.bytes <= budget

    changed_last = chain(4)
    changed_last["nodes"]["t3"]["inputs"]["add"] = 2
    last = engine.run(changed_last)
    assert (last.ran, last.cached, last.outputs) == (["t3"], ["t2"], {"last": 5.0})

    changed_second = chain(4)
    changed_second["nodes"]["t1"]["inputs"]["add"] = 2
    EXECUTIONS.clear()
    everything = engine.run(changed_second)
    assert (everything.ran, everything.cached, everything.outputs) == (["t0", "t1", "t2", "t3"], [], {"last": 5.0})
    assert EXECUTIONS == ["t0", "t1", "t2", "t3"] and engine.cache.bytes <= budget


def test_an_output_path_leaving_the_output_root_is_refused_before_anything_runs(registry: NodeRegistry,
                                                                               tmp_path: Path) -> None:
    calls: list[str] = []
    engine = Engine(registry, input_dirs=[tmp_path], output_dir=tmp_path / "out")
    graph = {"graphflow": 1, "nodes": {
        "solid": node("Solid", level=0.5),
        "save": node("SaveImage", image=link("solid.image"), prefix="../escaped"),
    }}

    with pytest.raises(ValidationError) as caught:
        engine.run(graph, on_event=lambda event: calls.append(type(event).__name__))

    [error] = caught.value.errors
    assert (error.code, error.node, error.input) == ("path_outside_root", "save", "prefix")
    assert calls == [] and not (tmp_path / "escaped_00000.png").exists()
