"""A node class is checked when it is declared: run takes exactly its inputs, and its names work in documents and
in the builder (an output cannot be named like an attribute of the builder's node handle)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest

from graphflow import Engine, Graph, Input, Node, Output, ValidationError
from graphflow.document import NAME_PATTERN
from graphflow.errors import Code
from graphflow.registry import NodeRegistry, RegistryError, default_registry
from graphflow.types import IMAGE, INT, STRING
from graphflow.validation import compile_document

TWO_INPUTS = (Input("a", INT, default=1), Input("b", INT, default=2))
SUM = (Output("sum", INT),)


def declare(name: str, run: Any, inputs: tuple[Input, ...] = TWO_INPUTS,
            outputs: tuple[Output, ...] = SUM) -> type[Node]:
    return type(name, (Node,), {"inputs": inputs, "outputs": outputs, "run": run})


# run's signature


def test_every_builtin_node_takes_exactly_its_inputs() -> None:
    from graphflow.node import run_signature_problems

    registry = default_registry()

    assert len(registry) > 30
    assert {node.type_name: run_signature_problems(node) for node in registry} == \
        {node.type_name: [] for node in registry}


def test_run_missing_a_declared_input_fails_when_the_class_is_defined() -> None:
    with pytest.raises(TypeError) as raised:
        class Adder(Node):
            inputs = TWO_INPUTS
            outputs = SUM

            def run(self, ctx: Any, a: int) -> dict[str, Any]:
                return {"sum": a}

    assert str(raised.value) == ("Adder (tests.graphflow.test_node_declaration.test_run_missing_a_declared_input_fails_"
                                 "when_the_class_is_defined.<locals>.Adder): run does not take the declared inputs "
                                 "['b']; add them to run's parameters (or take **inputs)")


def test_run_taking_an_undeclared_parameter_fails_naming_it_and_the_declared_ones() -> None:
    def run(self: Any, ctx: Any, a: int, b: int, c: int, scale: float = 1.0) -> dict[str, Any]:
        return {}

    with pytest.raises(TypeError, match=r"^Adder .*run takes parameters \['c', 'scale'\] that are not declared "
                                        r"inputs \(declared: a, b\)"):
        declare("Adder", run)


def test_missing_and_extra_parameters_are_reported_together() -> None:
    def run(self: Any, ctx: Any, a: int, bee: int) -> dict[str, Any]:
        return {}

    with pytest.raises(TypeError) as raised:
        declare("Misspelt", run)

    assert "run takes parameters ['bee']" in str(raised.value)
    assert "run does not take the declared inputs ['b']" in str(raised.value)


@pytest.mark.parametrize("signature", ["self, ctx, **inputs", "self, ctx, a, **inputs", "self, ctx, *, a, b",
                                       "self, ctx, /, a, b", "self, ctx, b, a", "self, *args, **kwargs",
                                       "self, context, a=0, b=0"])
def test_runs_that_take_every_input_by_name_are_accepted(signature: str) -> None:
    namespace: dict[str, Any] = {}
    exec(f"def run({signature}):\n    return {{}}", namespace)  # the signature is the test's own text

    declare("Accepted", namespace["run"])


def test_a_decorated_run_is_checked_through_its_wrapper() -> None:
    def logged(function: Any) -> Any:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)
        return wrapper

    @logged
    def run(self: Any, ctx: Any, a: int) -> dict[str, Any]:
        return {}

    with pytest.raises(TypeError, match=r"run does not take the declared inputs \['b'\]"):
        declare("Decorated", run)


@pytest.mark.parametrize(("signature", "problem"), [
    ("self", "must take the run context first"),
    ("self, *, ctx, a, b", "must take the run context first"),
    ("self, ctx, a, /, b", "run's parameters ['a'] are positional-only, but inputs are passed by name"),
])
def test_runs_the_engine_cannot_call_are_refused(signature: str, problem: str) -> None:
    namespace: dict[str, Any] = {}
    exec(f"def run({signature}):\n    return {{}}", namespace)

    with pytest.raises(TypeError, match=problem.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        declare("Uncallable", namespace["run"])


@pytest.mark.parametrize("name", ["ctx", "self"])
def test_an_input_named_like_runs_own_parameters_is_refused(name: str) -> None:
    with pytest.raises(TypeError, match=rf"inputs \['{name}'\] have the names of run's own parameters"):
        declare("Shadowing", lambda self, ctx, **inputs: {}, (Input(name, INT, default=0),))


def test_a_subclass_declaring_inputs_its_inherited_run_lacks_fails() -> None:
    class Base(Node):
        inputs = TWO_INPUTS
        outputs = SUM

        def run(self, ctx: Any, a: int, b: int) -> dict[str, Any]:
            return {"sum": a + b}

    with pytest.raises(TypeError, match=r"^Wider .*run does not take the declared inputs \['c'\]"):
        class Wider(Base):
            inputs = (*TWO_INPUTS, Input("c", INT, default=0))


def test_a_base_declaring_nothing_is_checked_in_its_subclasses_and_when_registered() -> None:
    class Detector(Node):  # as nodes.annotators.Annotator: run reads inputs that each subclass declares
        def run(self, ctx: Any, image: Any, **options: Any) -> dict[str, Any]:
            return {"image": image}

    class Edges(Detector):
        inputs = (Input("image", IMAGE), Input("low", INT, default=1))
        outputs = (Output("image", IMAGE),)

    assert NodeRegistry([Edges]).get("Edges") is Edges
    with pytest.raises(RegistryError, match=r"Detector .* cannot be registered: run takes parameters \['image'\]"):
        NodeRegistry([Detector])
    with pytest.raises(TypeError, match=r"^Blank .*run takes parameters \['image'\]"):
        class Blank(Detector):
            outputs = (Output("image", IMAGE),)


def test_a_mismatched_plugin_is_refused_when_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mismatched_plugin.py").write_text(
        "from graphflow import Input, Node, Output\n\n\n"
        "class Shout(Node):\n"
        '    inputs = (Input("text", "STRING"),)\n'
        '    outputs = (Output("text", "STRING"),)\n\n'
        "    def run(self, ctx, txt):\n"
        '        return {"text": txt.upper()}\n', encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(RegistryError, match=r"cannot import plugin module 'mismatched_plugin'.*Shout .*run takes "
                                            r"parameters \['txt'\].*does not take the declared inputs \['text'\]"):
        default_registry(["mismatched_plugin"])


# names and the builder


class Sample(Node):
    inputs = (Input("text", STRING, default=""),)
    outputs = (Output("text", STRING),)

    def run(self, ctx: Any, text: str) -> dict[str, Any]:
        return {"text": text}


HANDLE_ATTRIBUTES = sorted(name for name in dir(Sample(text="x")) if NAME_PATTERN.fullmatch(name))


def test_the_handle_attributes_under_test_include_the_builders_own() -> None:
    assert {"values", "run", "inputs", "outputs", "type_name", "version", "input_map", "outputs_still_valid",
            "__class__", "__init__"} <= set(HANDLE_ATTRIBUTES)


@pytest.mark.parametrize("name", [*HANDLE_ATTRIBUTES, "mro", "_private", "__wrapped__"])
def test_an_output_named_like_an_attribute_of_the_builders_handle_is_refused(name: str) -> None:
    with pytest.raises(TypeError, match=rf"outputs \['{name}'\] are named like attributes of the node in the "
                                        "builder"):
        declare("Clashing", lambda self, ctx, **inputs: {}, (), (Output(name, INT),))


def test_an_output_named_like_an_attribute_a_subclass_adds_is_refused() -> None:
    class Described(Node):
        spec: str  # annotated only, as a ClassVar a subclass sets

        def run(self, ctx: Any, **inputs: Any) -> dict[str, Any]:
            return {}

    with pytest.raises(TypeError, match=r"outputs \['spec'\] are named like attributes"):
        class Specced(Described):
            outputs = (Output("spec", INT),)


@pytest.mark.parametrize("name", ["a.b", "", "with space", "-lead", "caf\u00e9", "line\n", 3])
def test_names_documents_cannot_write_are_refused(name: Any) -> None:
    with pytest.raises(TypeError, match="are not letters, digits"):
        declare("BadOutput", lambda self, ctx, **inputs: {}, (), (Output(name, INT),))
    with pytest.raises(TypeError, match="are not letters, digits"):
        declare("BadInput", lambda self, ctx, **inputs: {}, (Input(name, INT, default=0),), SUM)


def test_declarations_that_are_not_inputs_and_outputs_are_refused() -> None:
    with pytest.raises(TypeError, match="inputs must be a tuple of Input"):
        declare("Loose", lambda self, ctx, **inputs: {}, ("a", "b"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="outputs must be a tuple of Output"):
        declare("Loose", lambda self, ctx, **inputs: {}, (), (Input("sum", INT),))  # type: ignore[arg-type]


class Attributes(Node):
    """Inputs named like the handle's attributes: they are keyword arguments, never attributes, so they work."""

    inputs = (Input("values", INT, default=0), Input("run", INT, default=0), Input("self", INT, default=0),
              Input("type_name", STRING, default=""), Input("outputs", INT, default=0))
    outputs = (Output("total", INT),)

    def run(self, ctx: Any, /, **inputs: Any) -> dict[str, Any]:  # positional-only: an input may be named self
        return {"total": inputs["values"] + inputs["run"] + inputs["self"] + inputs["outputs"]}


def test_inputs_named_like_handle_attributes_work_in_the_builder_and_in_runs(tmp_path: Path) -> None:
    g = Graph()
    node = g.add(Attributes(values=1, run=2, self=3, outputs=4, type_name="t"), "n")
    g.output("total", node.total)

    assert node.values == {"values": 1, "run": 2, "self": 3, "outputs": 4, "type_name": "t"}
    assert node.type_name == "Attributes" and callable(node.run)
    assert g.to_document()["nodes"]["n"]["inputs"] == node.values
    engine = Engine(NodeRegistry([Attributes]), input_dirs=[tmp_path], output_dir=tmp_path / "out")
    assert engine.run(g).outputs == {"total": 10}
    assert Graph.from_document(g.to_document(), NodeRegistry([Attributes]))["n"].values == node.values


@pytest.mark.parametrize("name", ["values", "run", "template_path", "template_document", "inputs", "_hidden"])
def test_a_template_output_named_like_a_handle_attribute_is_a_validation_error(tmp_path: Path, name: str) -> None:
    (tmp_path / "inner.json").write_text(json.dumps({
        "graphflow": 1, "nodes": {"s": {"type": "Sample"}}, "outputs": {name: "s.text"}}), encoding="utf-8")
    document = {"graphflow": 1, "nodes": {"t": {"template": "inner.json"}}, "outputs": {"o": f"t.{name}"}}

    with pytest.raises(ValidationError) as raised:
        compile_document(document, NodeRegistry([Sample]), base_dir=tmp_path)

    (error,) = raised.value.errors
    assert (error.code, error.node) == (Code.INVALID_DOCUMENT, "t")
    assert f"outputs ['{name}'] cannot be template outputs" in error.message


@pytest.mark.parametrize("name", ["ctx", "self", "values"])
def test_template_params_named_like_runs_parameters_work(tmp_path: Path, name: str) -> None:
    (tmp_path / "inner.json").write_text(json.dumps({
        "graphflow": 1, "params": {name: {"type": "STRING", "default": "x"}},
        "nodes": {"s": {"type": "Sample", "inputs": {"text": {"param": name}}}}, "outputs": {"text": "s.text"}}),
        encoding="utf-8")
    (tmp_path / "outer.json").write_text(json.dumps({
        "graphflow": 1, "nodes": {"t": {"template": "inner.json", "inputs": {name: "hello"}}},
        "outputs": {"text": "t.text"}}), encoding="utf-8")
    engine = Engine(NodeRegistry([Sample]), input_dirs=[tmp_path], output_dir=tmp_path / "out")

    assert engine.run(tmp_path / "outer.json").outputs == {"text": "hello"}
