"""No stale result: what a node reads is what its key was made from, and what cannot be keyed is refused.

File and model inputs are keyed by what they name (a file's bytes, a model's files), known when the run is
planned. A value that only a link could give is refused, in every form a link can take; a file rewritten after
planning reaches the node as the bytes that were hashed; ranges hold for values that arrive through links.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from graphflow import Engine, Graph, NodeExecutionError, ValidationError, default_registry
from graphflow.context import RunContext
from graphflow.node import Input, Node, Output
from graphflow.registry import NodeRegistry
from graphflow.types import FLOAT, INT, STRING

RUNS: list[str] = []


class ReadText(Node):
    """The text of a file, as the engine handed it to the node."""

    inputs = (Input("path", STRING, file=True), Input("after", FLOAT, default=0.0))
    outputs = (Output("text", STRING),)

    def run(self, ctx: RunContext, path: str, after: float) -> dict[str, Any]:
        RUNS.append("read")
        return {"text": ctx.read_file(path).decode()}


class Rewrite(Node):
    """Rewrites a file while the run is under way (after planning), then passes on a number."""

    inputs = (Input("target", STRING), Input("text", STRING))
    outputs = (Output("done", FLOAT),)

    def run(self, ctx: RunContext, target: str, text: str) -> dict[str, Any]:
        ctx.input_path(target, "target").write_text(text)
        return {"done": 1.0}


class Steps(Node):
    """Counts its runs; steps has a range, like a sampler's."""

    inputs = (Input("steps", INT, default=1, min=1, max=100),
              Input("mode", STRING, default="a", choices=("a", "b")))
    outputs = (Output("steps", INT),)

    def run(self, ctx: RunContext, steps: int, mode: str) -> dict[str, Any]:
        RUNS.append("steps")
        return {"steps": steps}


@pytest.fixture
def registry() -> NodeRegistry:
    RUNS.clear()
    registry = default_registry()
    for node_type in (ReadText, Rewrite, Steps):
        registry.register(node_type)
    return registry


@pytest.fixture
def engine(registry: NodeRegistry, tmp_path: Path) -> Engine:
    return Engine(registry, input_dirs=[tmp_path], output_dir=tmp_path / "out")


def doc(nodes: dict[str, Any], outputs: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"graphflow": 1, "nodes": nodes, "outputs": outputs or {}, **extra}


def test_a_file_rewritten_after_planning_reaches_the_node_as_the_bytes_that_were_keyed(
        engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("old")
    graph = doc({
        "rewrite": {"type": "Rewrite", "inputs": {"target": "notes.txt", "text": "new"}},
        "read": {"type": "ReadText", "inputs": {"path": "notes.txt", "after": {"from": "rewrite.done"}}},
    }, {"text": "read.text"})
    first = engine.run(graph)
    assert first.outputs["text"] == "old"  # planned with "old": the node got "old", though the file says "new"
    second = engine.run(graph)  # planned with "new": a new key, so it runs again
    assert second.outputs["text"] == "new" and "read" in second.ran
    assert engine.run(graph).ran == [] and engine.run(graph).outputs["text"] == "new"


def test_the_disk_tier_stores_under_the_key_of_the_bytes_the_node_read(registry: NodeRegistry, tmp_path: Path) -> None:
    ReadText.disk_cache = True
    try:
        (tmp_path / "notes.txt").write_text("old")
        graph = doc({
            "rewrite": {"type": "Rewrite", "inputs": {"target": "notes.txt", "text": "new"}},
            "read": {"type": "ReadText", "inputs": {"path": "notes.txt", "after": {"from": "rewrite.done"}}},
        }, {"text": "read.text"})
        Engine(registry, input_dirs=[tmp_path], disk_cache=tmp_path / "cache").run(graph)
        fresh = Engine(registry, input_dirs=[tmp_path], disk_cache=tmp_path / "cache").run(graph)
        assert fresh.outputs["text"] == "new"  # the "old" result is filed under the key of "old", never "new"
    finally:
        ReadText.disk_cache = False


LINKED_SOURCES = [
    ("a String node", {"name": {"type": "String", "inputs": {"value": "tiny:sd15"}},
                       "load": {"type": "CheckpointLoader", "inputs": {"model": {"from": "name.value"}}}}),
    ("a String node into a file input", {"name": {"type": "String", "inputs": {"value": "x.png"}},
                                         "load": {"type": "LoadImage", "inputs": {"path": {"from": "name.value"}}}}),
    ("the Depth model", {"name": {"type": "String", "inputs": {"value": "tiny:dpt"}},
                         "img": {"type": "LoadImage", "inputs": {"path": "x.png"}},
                         "load": {"type": "Depth", "inputs": {"image": {"from": "img.image"},
                                                              "model": {"from": "name.value"}}}}),
]


@pytest.mark.parametrize(("what", "nodes"), LINKED_SOURCES, ids=[case[0] for case in LINKED_SOURCES])
def test_links_into_file_and_model_inputs_are_refused(engine: Engine, what: str, nodes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as caught:
        engine.compile(doc(nodes, {"out": "name.value"}))
    [error] = caught.value.errors
    assert (error.code, error.node) == ("invalid_value", "load") and "not a link" in error.message


def test_a_template_param_bound_to_a_link_cannot_feed_a_model_input(engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "loader.json").write_text(json.dumps(doc(
        {"load": {"type": "ControlNetLoader", "inputs": {"model": {"param": "source"}}}},
        {"controlnet": "load.controlnet"}, params={"source": {"type": "STRING"}})))
    outer = doc({"name": {"type": "String", "inputs": {"value": "tiny:controlnet-canny"}},
                 "use": {"template": "loader.json", "inputs": {"source": {"from": "name.value"}}}},
                {"out": "name.value"})
    (tmp_path / "outer.json").write_text(json.dumps(outer))
    with pytest.raises(ValidationError) as caught:
        engine.compile(tmp_path / "outer.json")
    [error] = caught.value.errors
    assert error.code == "invalid_value" and error.node == "use/load" and "param 'source'" in error.found
    literal = doc({"use": {"template": str(tmp_path / "loader.json"), "inputs": {"source": "tiny:controlnet-canny"}}},
                  {"cn": "use.controlnet"})
    assert engine.compile(literal).nodes["use/load"].inputs["model"] == "tiny:controlnet-canny"


def test_the_builder_refuses_handles_for_model_inputs_at_the_call() -> None:
    from nodes import CheckpointLoader, String

    graph = Graph("g")
    name = graph.add(String(value="tiny:sd15"), "name")
    with pytest.raises(ValidationError) as caught:
        CheckpointLoader(model=name.value)
    assert caught.value.codes == ["invalid_value"]


# Ranges and choices hold for linked values


@pytest.mark.parametrize(("feed", "code", "found"), [
    ({"type": "Int", "inputs": {"value": 100000}}, "value_out_of_range", "100000"),
    ({"type": "Int", "inputs": {"value": 0}}, "value_out_of_range", "0"),
])
def test_a_linked_value_outside_the_range_stops_the_run_before_the_node(
        engine: Engine, feed: dict[str, Any], code: str, found: str) -> None:
    graph = doc({"n": feed, "s": {"type": "Steps", "inputs": {"steps": {"from": "n.value"}}}}, {"out": "s.steps"})
    with pytest.raises(ValidationError) as caught:
        engine.run(graph)
    [error] = caught.value.errors
    assert (error.code, error.node, error.input, error.found) == (code, "s", "steps", found)
    assert "arrived through a link" in error.message and RUNS == []


def test_a_linked_choice_is_checked(engine: Engine) -> None:
    graph = doc({"n": {"type": "String", "inputs": {"value": "c"}},
                 "s": {"type": "Steps", "inputs": {"mode": {"from": "n.value"}}}}, {"out": "s.steps"})
    with pytest.raises(ValidationError) as caught:
        engine.run(graph)
    assert caught.value.codes == ["value_not_in_choices"] and RUNS == []


def test_a_template_param_feeding_a_bounded_input_through_a_link_is_checked(engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "latent.json").write_text(json.dumps(doc(
        {"empty": {"type": "EmptyLatent", "inputs": {"batch": {"param": "batch"}, "width": 64, "height": 64}}},
        {"latent": "empty.latent"}, params={"batch": {"type": "INT"}})))
    outer = doc({"count": {"type": "Int", "inputs": {"value": 70000}},
                 "t": {"template": str(tmp_path / "latent.json"), "inputs": {"batch": {"from": "count.value"}}}},
                {"latent": "t.latent"})
    with pytest.raises(ValidationError) as caught:
        engine.run(outer)
    [error] = caught.value.errors
    assert (error.code, error.node, error.input) == ("value_out_of_range", "t/empty", "batch")


def test_linked_values_inside_the_range_run(engine: Engine) -> None:
    graph = doc({"n": {"type": "Int", "inputs": {"value": 7}},
                 "s": {"type": "Steps", "inputs": {"steps": {"from": "n.value"}}}}, {"out": "s.steps"})
    assert engine.run(graph).outputs == {"out": 7}


def test_file_digests_are_of_the_bytes_read(tmp_path: Path, registry: NodeRegistry) -> None:
    """The key part for a file is the digest of its bytes, whatever its name or time."""
    (tmp_path / "a.txt").write_bytes(b"same")
    (tmp_path / "b.txt").write_bytes(b"same")
    engine = Engine(registry, input_dirs=[tmp_path])
    graph = doc({"a": {"type": "ReadText", "inputs": {"path": "a.txt"}},
                 "b": {"type": "ReadText", "inputs": {"path": "b.txt"}}}, {"a": "a.text", "b": "b.text"})
    result = engine.run(graph)
    assert result.ran == ["a"] and result.cached == ["b"]  # identical bytes, one result


class ReadModel(Node):
    """Reads a model folder's config; with `touch`, rewrites it while running (as a second writer would)."""

    inputs = (Input("model", STRING, model=True), Input("touch", STRING, default=""))
    outputs = (Output("text", STRING),)

    def run(self, ctx: RunContext, model: str, touch: str) -> dict[str, Any]:
        RUNS.append("model")
        folder = ctx.input_path(model, "model", directory=True) if (ctx.paths.input_roots[0] / model).exists() \
            else None
        if folder is not None and touch:
            (folder / "config.json").write_text(touch)
        return {"text": (folder / "config.json").read_text() if folder is not None else "none"}


@pytest.fixture
def model_engine(registry: NodeRegistry, tmp_path: Path) -> Engine:
    registry.register(ReadModel)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"a": 1}')
    return Engine(registry, input_dirs=[tmp_path])


def test_a_model_whose_files_change_while_its_node_runs_fails_the_node(model_engine: Engine) -> None:
    graph = doc({"m": {"type": "ReadModel", "inputs": {"model": "model", "touch": '{"a": 2}'}}}, {"t": "m.text"})
    with pytest.raises(NodeExecutionError) as caught:
        model_engine.run(graph)
    assert type(caught.value.cause).__name__ == "ModelChangedError" and "'model'" in str(caught.value)
    untouched = doc({"m": {"type": "ReadModel", "inputs": {"model": "model"}}}, {"t": "m.text"})
    assert model_engine.run(untouched).outputs["t"] == '{"a": 2}'


def test_results_resting_on_a_source_without_fingerprint_are_not_cached(model_engine: Engine) -> None:
    graph = doc({"m": {"type": "ReadModel", "inputs": {"model": "someone/not-downloaded"}},
                 "n": {"type": "JoinText", "inputs": {"texts": [{"from": "m.text"}]}}}, {"t": "n.text"})
    assert model_engine.run(graph).ran == ["m", "n"]
    assert model_engine.run(graph).ran == ["m", "n"]  # nothing was kept: the next run may find the files
    known = doc({"m": {"type": "ReadModel", "inputs": {"model": "model"}}}, {"t": "m.text"})
    model_engine.run(known)
    assert model_engine.run(known).ran == []
