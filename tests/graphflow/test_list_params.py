"""List-typed params: `{"type": "INT", "list": true}` declares a list of INT values, given whole to a list input
(or spliced into a list of values), checked item by item, written on the command line as 1,2,3 or a JSON list."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest

from graphflow import Engine, ValidationError, dumps, save_document
from graphflow.schema import document_schema
from graphflow.templates import parse_assignments

JOIN = {"type": "JoinText", "inputs": {"texts": {"param": "words"}, "separator": "-"}}


def document(params: dict, nodes: dict | None = None) -> dict:
    return {"graphflow": 1, "params": params, "nodes": nodes or {"join": JOIN}, "outputs": {"text": "join.text"}}


WORDS = {"words": {"type": "STRING", "list": True, "default": ["a", "b"]}}


def test_a_list_param_feeds_a_list_input_whole() -> None:
    engine = Engine()
    assert engine.run(document(WORDS)).outputs["text"] == "a-b"
    assert engine.run(document(WORDS), {"words": ["x", "y", "z"]}).outputs["text"] == "x-y-z"
    assert engine.run(document(WORDS), {"words": []}).outputs["text"] == ""


def test_a_list_param_is_spliced_into_a_list_of_values() -> None:
    nodes = {"join": {"type": "JoinText", "inputs": {"texts": ["first", {"param": "words"}, "last"]}}}
    assert Engine().run(document(WORDS, nodes)).outputs["text"] == "first, a, b, last"


def test_a_list_param_cannot_feed_an_input_of_one_value() -> None:
    nodes = {"n": {"type": "Int", "inputs": {"value": {"param": "seeds"}}}}
    bad = {"graphflow": 1, "params": {"seeds": {"type": "INT", "list": True, "default": [1]}}, "nodes": nodes}
    with pytest.raises(ValidationError) as caught:
        Engine().compile(bad)
    [error] = caught.value.errors
    assert (error.code, error.node, error.input) == ("type_mismatch", "n", "value")
    assert "a list of INT" in error.message and error.expected == "one INT"


def test_list_values_are_checked_item_by_item_and_must_be_lists() -> None:
    seeds = {"seeds": {"type": "INT", "list": True, "default": [0], "min": 0, "max": 9}}
    nodes = {"s": {"type": "Sampler", "inputs": {"seed": {"param": "seeds"}}}}
    with pytest.raises(ValidationError) as caught:
        Engine().compile({"graphflow": 1, "params": seeds, "nodes": {}}, {"seeds": [1, 12]})
    assert caught.value.codes == ["value_out_of_range"]
    with pytest.raises(ValidationError) as caught:
        Engine().compile({"graphflow": 1, "params": seeds, "nodes": {}}, {"seeds": 3})
    assert caught.value.codes == ["invalid_value"] and "a list of INT" in caught.value.errors[0].message
    assert nodes  # the Sampler's seed takes such a list (see tests/graphs/test_archviz_parity.py)


@pytest.mark.parametrize(("declaration", "problem"), [
    ({"type": "IMAGE", "list": True}, "'list' that does not apply"),
    ({"type": "INT", "list": "yes"}, "'list' that does not apply"),
    ({"type": "INT", "list": True, "default": 3}, "is a list of INT"),
    ({"type": "INT", "default": [3]}, "not a list"),
    ({"type": "STRING", "list": True, "default": ["a", "c"], "choices": ["a", "b"]}, "choose one of"),
])
def test_bad_list_declarations_are_reported(declaration: dict, problem: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Engine().compile({"graphflow": 1, "params": {"p": declaration}, "nodes": {}})
    assert caught.value.codes == ["invalid_param"] and problem in caught.value.errors[0].message


def test_list_values_from_the_command_line() -> None:
    params = {"seeds": {"type": "INT", "list": True}, "words": {"type": "STRING", "list": True},
              "scales": {"type": "FLOAT", "list": True}}
    values = parse_assignments(document(params), ["seeds=0, 1,2", "words=[\"a, b\", \"c\"]", "scales="])
    assert values == {"seeds": [0, 1, 2], "words": ["a, b", "c"], "scales": []}
    with pytest.raises(ValidationError) as caught:
        parse_assignments(document(params), ["seeds=1,two", "words=[1]", "seeds=[1,"])
    assert caught.value.codes == ["invalid_value"] * 3
    assert caught.value.errors[0].expected == "a list of INT (1,2,3 or a JSON list)"


def test_a_template_with_a_list_param_takes_a_list_as_a_node_input(tmp_path: Path) -> None:
    save_document(document(WORDS), tmp_path / "join.json")
    outer = {"graphflow": 1, "nodes": {"t": {"template": "join.json", "inputs": {"words": ["p", "q"]}}},
             "outputs": {"text": "t.text"}}
    save_document(outer, tmp_path / "outer.json")
    assert Engine(input_dirs=[tmp_path]).run(tmp_path / "outer.json").outputs["text"] == "p-q"


def test_list_params_save_stably_and_match_the_schema() -> None:
    text = dumps(document(WORDS))
    assert '"words": {"type": "STRING", "list": true, "default": ["a", "b"]}' in text
    jsonschema.validate(document(WORDS), document_schema(Engine().registry))


def test_the_builder_refuses_a_list_param_at_an_input_of_one_value() -> None:
    from graphflow import Graph
    from nodes import Int

    graph = Graph("seeds")
    seeds = graph.param("seeds", "INT", [1, 2], list=True)
    with pytest.raises(ValidationError) as caught:
        Int(value=seeds)
    assert caught.value.codes == ["type_mismatch"] and caught.value.errors[0].expected == "one INT"
