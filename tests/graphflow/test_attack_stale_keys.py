"""Attacks on compile memos and cache keys: templates swapped behind symlinks, file inputs keyed by name, edits
of values equal in Python but not in JSON, one CompiledGraph run by two Engines, cancelled runs re-run. Each
outcome is compared with a fresh Engine (no caches) as the oracle."""

from __future__ import annotations

import copy
import json
import os
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest

from graphflow import Engine, default_registry
from graphflow.context import RunContext
from graphflow.errors import Cancelled
from graphflow.events import CancelToken, NodeStarted
from graphflow.node import Input, Node, Output
from graphflow.types import FLOAT, STRING


def template(value: int) -> dict[str, Any]:
    return {"graphflow": 1, "params": {}, "nodes": {"i": {"type": "Int", "inputs": {"value": value}}},
            "outputs": {"v": "i.value"}}


@pytest.fixture
def swappable(tmp_path: Path) -> Path:
    """tmp_path/A/t.json (value 1), tmp_path/B/t.json (value 2), and tmp_path/lib -> A."""
    for folder, value in (("A", 1), ("B", 2)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "t.json").write_text(json.dumps(template(value)))
    (tmp_path / "lib").symlink_to(tmp_path / "A", target_is_directory=True)
    return tmp_path


def swap(link: Path, target: Path) -> None:
    os.unlink(link)
    link.symlink_to(target, target_is_directory=target.is_dir())


def test_a_template_file_symlink_pointed_at_another_template_is_compiled_again(swappable: Path) -> None:
    (swappable / "t.json").symlink_to(swappable / "A" / "t.json")
    main = swappable / "main.json"
    main.write_text(json.dumps({"graphflow": 1, "nodes": {"t": {"template": "t.json"}}, "outputs": {"v": "t.v"}}))
    engine = Engine(input_dirs=[swappable])
    assert engine.run(main).outputs == {"v": 1}

    swap(swappable / "t.json", swappable / "B" / "t.json")

    assert Engine(input_dirs=[swappable]).run(main).outputs == {"v": 2}  # the oracle
    assert engine.run(main).outputs == {"v": 2}


def test_a_template_folder_symlink_pointed_elsewhere_is_compiled_again(swappable: Path) -> None:
    document = {"graphflow": 1, "name": "m", "nodes": {"t": {"template": str(swappable / "lib" / "t.json")}},
                "outputs": {"v": "t.v"}}
    engine = Engine(input_dirs=[swappable])
    assert engine.run(copy.deepcopy(document)).outputs == {"v": 1}

    swap(swappable / "lib", swappable / "B")

    assert Engine(input_dirs=[swappable]).run(copy.deepcopy(document)).outputs == {"v": 2}
    assert engine.run(copy.deepcopy(document)).outputs == {"v": 2}


def test_a_template_file_replaced_by_rename_is_compiled_again(swappable: Path) -> None:
    """Resisted: `mv` over the template (the usual atomic save) changes the bytes at the recorded path."""
    (swappable / "t.json").write_text(json.dumps(template(1)))
    main = swappable / "main.json"
    main.write_text(json.dumps({"graphflow": 1, "nodes": {"t": {"template": "t.json"}}, "outputs": {"v": "t.v"}}))
    engine = Engine(input_dirs=[swappable])
    assert engine.run(main).outputs == {"v": 1}
    os.replace(swappable / "B" / "t.json", swappable / "t.json")
    assert engine.run(main).outputs == {"v": 2}


def test_a_list_of_files_cannot_be_declared_since_it_could_not_be_keyed() -> None:
    """A list input marked `file` would be keyed by its names: refused when the node type is declared."""
    with pytest.raises(TypeError, match="lists of files or model sources"):
        type("ReadAll", (Node,), {"inputs": (Input("paths", STRING, list=True, file=True),),
                                  "outputs": (Output("text", STRING),)})


def _math(a: Any, b: Any = 1.0, op: str = "mul") -> dict[str, Any]:
    return {"graphflow": 1, "name": "same-name", "nodes": {
        "m": {"type": "Math", "inputs": {"a": a, "b": b, "op": op}},
        "j": {"type": "JoinText", "inputs": {"texts": ["x", {"from": "s.value"}]}},
        "s": {"type": "String", "inputs": {"value": "y"}},
    }, "outputs": {"r": "m.result", "t": "j.text"}}


EDITS = [  # successive documents under one name; each must give what a fresh engine gives
    _math(0.0), _math(-0.0), _math(0.0), _math(1), _math(1.0), _math(2),
    {**_math(3.0), "nodes": {**_math(3.0)["nodes"], "s": {"type": "Int", "inputs": {"value": 5}},
                             "j": {"type": "JoinText", "inputs": {"texts": ["x"]}}}},
    _math(3.0), _math(-0.0, b=-0.0, op="add"), _math(0.0, b=-0.0, op="add"),
]


def test_edits_under_one_name_give_what_a_fresh_engine_gives() -> None:
    """Resisted: 0.0 / -0.0, 1 / 1.0, a node retyped under its id and back; one long-lived Engine agrees with a
    fresh one after every edit (values are compared with their signs: 0.0 == -0.0 in Python)."""
    engine = Engine()
    for document in EDITS:
        got = engine.run(copy.deepcopy(document)).outputs
        want = Engine().run(copy.deepcopy(document)).outputs
        assert repr(got) == repr(want), document


def test_params_equal_in_python_but_not_in_json_are_not_mistaken_for_one_another(tmp_path: Path) -> None:
    """Resisted: a path document run with 0.0, -0.0, 1 and 1.0 for one FLOAT param (equal in Python) gives what a
    fresh engine gives each time."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"graphflow": 1, "params": {"x": {"type": "FLOAT", "default": 2.0}}, "nodes": {
        "m": {"type": "Math", "inputs": {"a": {"param": "x"}, "b": 0.0, "op": "add"}}}, "outputs": {"r": "m.result"}}))
    engine = Engine(input_dirs=[tmp_path])
    for value in (0.0, -0.0, 0.0, 1, 1.0, -0.0):
        got = engine.run(path, {"x": value}).outputs
        assert repr(got) == repr(Engine(input_dirs=[tmp_path]).run(path, {"x": value}).outputs), value


def test_one_compiled_graph_run_by_engines_with_other_input_roots_reads_each_ones_files(tmp_path: Path) -> None:
    """Resisted: the plan memo of a shared CompiledGraph is per path policy, and keys follow the bytes read."""
    registry = default_registry()
    registry.register(ReadText)
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "note.txt").write_text(folder)
    graph = {"graphflow": 1, "nodes": {"r": {"type": "ReadText", "inputs": {"path": "note.txt"}}},
             "outputs": {"text": "r.text"}}
    first = Engine(registry, input_dirs=[tmp_path / "one"])
    compiled = first.compile(graph)
    second = Engine(registry, input_dirs=[tmp_path / "two"])
    assert second.run(compiled).outputs == {"text": "two"}
    assert first.run(compiled).outputs == {"text": "one"}
    assert second.run(compiled, options={"device": "cpu"}).outputs == {"text": "two"}


class ReadText(Node):
    inputs = (Input("path", STRING, file=True),)
    outputs = (Output("text", STRING),)

    def run(self, ctx: RunContext, path: str) -> dict[str, Any]:
        return {"text": ctx.read_file(path).decode()}


class Slow(Node):
    """Waits on `gate` between two checks for cancellation, like a sampler between steps."""

    gate: ClassVar[threading.Event] = threading.Event()
    runs: ClassVar[list[float]] = []
    inputs = (Input("x", FLOAT),)
    outputs = (Output("y", FLOAT),)

    def run(self, ctx: RunContext, x: float) -> dict[str, Any]:
        Slow.runs.append(x)
        ctx.progress(0, 2)
        Slow.gate.wait(5)
        ctx.progress(1, 2)
        return {"y": x * 2}


def test_a_run_cancelled_mid_node_caches_nothing_of_it_and_a_waiting_run_computes_it_itself() -> None:
    """Resisted: the cancelled run lands no result; a concurrent run waiting for the same key computes it, and a
    later run finds it cached."""
    registry = default_registry()
    registry.register(Slow)
    Slow.gate.clear()
    Slow.runs.clear()
    graph = {"graphflow": 1, "nodes": {"s": {"type": "Slow", "inputs": {"x": 2.0}}}, "outputs": {"y": "s.y"}}
    engine = Engine(registry)
    token, started = CancelToken(), threading.Event()
    outcome: dict[str, Any] = {}

    def cancelled_run() -> None:
        try:
            engine.run(graph, cancel=token, on_event=lambda e: started.set() if isinstance(e, NodeStarted) else None)
        except Cancelled:
            outcome["first"] = "cancelled"

    def waiting_run() -> None:
        outcome["second"] = engine.run(graph).outputs

    first = threading.Thread(target=cancelled_run)
    first.start()
    assert started.wait(5)
    second = threading.Thread(target=waiting_run)
    second.start()
    token.cancel()
    Slow.gate.set()
    first.join(10)
    second.join(10)
    assert outcome == {"first": "cancelled", "second": {"y": 4.0}}
    assert engine.run(graph).cached == ["s"] and Slow.runs == [2.0, 2.0]
