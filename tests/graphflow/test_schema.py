"""The JSON Schema of documents: a valid draft 2020-12 schema that accepts good documents and rejects bad ones."""

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from jsonschema.exceptions import best_match

from graphflow import default_registry
from graphflow.registry import NodeRegistry
from graphflow.schema import SCHEMA_ID, document_schema
from graphflow.validation import validate_document

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"

VALID: dict[str, Any] = {
    "$schema": "https://graphflow.dev/schema/graph-1.json",
    "graphflow": 1,
    "name": "canny",
    "description": "Photo -> Canny edges",
    "params": {"low": {"type": "INT", "default": 100, "min": 0, "max": 255, "description": "lower threshold"}},
    "nodes": {
        "photo": {"type": "LoadImage", "inputs": {"path": "room.png"}},
        "edges": {"type": "Canny", "version": "1.0.0",
                  "inputs": {"image": {"from": "photo.image"}, "low": {"param": "low"}, "high": 200}},
        "half": {"type": "Math", "inputs": {"a": 1, "b": 0.5, "op": "mul"}},
        "save": {"type": "SaveImage", "inputs": {"image": {"from": "edges.image"}}},
    },
    "outputs": {"edges": "edges.image"},
}


@pytest.fixture(scope="module")
def registry() -> NodeRegistry:
    return default_registry()


TEMPLATES = sorted((GRAPHS / "templates").glob("*.json"))


@pytest.fixture(scope="module")
def validator(registry: NodeRegistry) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(document_schema(registry))


def changed(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """VALID with the member at `path` set to `value`."""
    document = copy.deepcopy(VALID)
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return document


def without(path: tuple[str, ...]) -> dict[str, Any]:
    """VALID with the member at `path` removed."""
    document = copy.deepcopy(VALID)
    target = document
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return document


def test_schema_is_a_valid_draft_2020_12_schema(registry: NodeRegistry) -> None:
    schema = document_schema(registry)

    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert json.loads(json.dumps(schema)) == schema  # plain JSON, printable by `graphflow schema`


def test_schema_describes_every_registered_node_with_defaults_ranges_and_enums(registry: NodeRegistry) -> None:
    definitions = document_schema(registry)["$defs"]

    assert {f"node.{name}" for name in registry.names()} <= set(definitions)
    low = definitions["node.Canny"]["properties"]["inputs"]["properties"]["low"]
    assert low["default"] == 100
    assert {"type": "integer", "minimum": 0, "maximum": 255} in low["anyOf"]
    op = definitions["node.Math"]["properties"]["inputs"]["properties"]["op"]
    assert {"type": "string", "enum": ["add", "sub", "mul", "div", "min", "max"]} in op["anyOf"]
    assert definitions["node.Canny"]["properties"]["inputs"]["required"] == ["image"]


def test_inline_valid_document_passes(validator: jsonschema.Draft202012Validator, registry: NodeRegistry) -> None:
    assert validate_document(VALID, registry) == []
    assert list(validator.iter_errors(VALID)) == []


def test_template_node_passes(validator: jsonschema.Draft202012Validator) -> None:
    document = changed(("nodes", "overlay"), {"template": "templates/edge_overlay.json",
                                             "inputs": {"image": {"from": "photo.image"}}})

    assert list(validator.iter_errors(document)) == []


def test_node_without_inputs_passes_when_none_are_required(validator: jsonschema.Draft202012Validator) -> None:
    assert list(validator.iter_errors(changed(("nodes", "two"), {"type": "Int"}))) == []


@pytest.mark.parametrize("path", sorted(GRAPHS.rglob("*.json")), ids=lambda path: str(path.relative_to(GRAPHS)))
def test_example_graph_passes(validator: jsonschema.Draft202012Validator, path: Path) -> None:
    document = json.loads(path.read_text(encoding="utf-8"))

    assert [error.message for error in validator.iter_errors(document)] == []


@pytest.mark.parametrize("document", [
    pytest.param(without(("graphflow",)), id="missing-graphflow-tag"),
    pytest.param(changed(("graphflow",), 2), id="newer-format"),
    pytest.param(changed(("graphflow",), True), id="bool-format"),
    pytest.param(without(("nodes",)), id="missing-nodes"),
    pytest.param(changed(("colour",), "red"), id="unknown-top-level-key"),
    pytest.param(changed(("nodes", "edges", "type"), "Cany"), id="unknown-node-type"),
    pytest.param(changed(("nodes", "edges", "inputs", "lo"), 50), id="unknown-input"),
    pytest.param(changed(("nodes", "edges", "colour"), "red"), id="unknown-node-key"),
    pytest.param(changed(("nodes", "edges", "inputs", "low"), "100"), id="string-for-int"),
    pytest.param(changed(("nodes", "edges", "inputs", "low"), True), id="bool-for-int"),
    pytest.param(changed(("nodes", "edges", "inputs", "low"), 300), id="out-of-range"),
    pytest.param(changed(("nodes", "edges", "inputs", "high"), -1), id="below-range"),
    pytest.param(changed(("nodes", "half", "inputs", "op"), "pow"), id="enum-violation"),
    pytest.param(changed(("nodes", "half", "inputs", "a"), "one"), id="string-for-float"),
    pytest.param(changed(("nodes", "photo", "inputs", "path"), 7), id="int-for-string"),
    pytest.param(changed(("nodes", "edges", "inputs", "image"), "room.png"), id="literal-for-image"),
    pytest.param(without(("nodes", "edges", "inputs", "image")), id="missing-required-input"),
    pytest.param(without(("nodes", "photo", "inputs")), id="missing-inputs-object"),
    pytest.param(changed(("nodes", "edges", "inputs", "image"), {"from": "photo"}), id="link-without-output"),
    pytest.param(changed(("nodes", "edges", "inputs", "image"), {"from": "photo.image.red"}), id="link-too-deep"),
    pytest.param(changed(("nodes", "edges", "inputs", "image"), {"from": 3}), id="link-not-a-string"),
    pytest.param(changed(("nodes", "edges", "inputs", "image"), {"from": "photo.image", "x": 1}), id="link-extra-key"),
    pytest.param(changed(("nodes", "edges", "inputs", "image"), ["photo", 0]), id="positional-link"),
    pytest.param(changed(("nodes", "edges", "inputs", "low"), {"param": 3}), id="param-ref-not-a-string"),
    pytest.param(changed(("nodes", "bad id"), {"type": "Int"}), id="invalid-node-id"),
    pytest.param(changed(("outputs", "edges"), "edges"), id="output-without-node-output"),
    pytest.param(changed(("params", "low", "type"), "NUMBER"), id="unknown-param-type"),
    pytest.param(changed(("params", "low", "colour"), "red"), id="unknown-param-key"),
    pytest.param(changed(("nodes", "overlay"), {"template": "t.json", "type": "Int"}), id="template-and-type"),
])
def test_malformed_document_fails(validator: jsonschema.Draft202012Validator, document: dict[str, Any]) -> None:
    assert not validator.is_valid(document)


@pytest.mark.parametrize("document", [
    pytest.param(changed(("nodes", "edges", "inputs", "low"), 300), id="out-of-range"),
    pytest.param(changed(("nodes", "half", "inputs", "op"), "pow"), id="enum-violation"),
    pytest.param(changed(("nodes", "edges", "inputs", "lo"), 50), id="unknown-input"),
    pytest.param(without(("nodes", "edges", "inputs", "image")), id="missing-required-input"),
])
def test_schema_and_validation_reject_the_same_literal_problems(
    validator: jsonschema.Draft202012Validator, registry: NodeRegistry, document: dict[str, Any]
) -> None:
    assert not validator.is_valid(document)
    assert validate_document(document, registry) != []


def first_error(validator: jsonschema.Draft202012Validator, document: dict[str, Any]) -> tuple[str, list[Any]]:
    """The error a checker shows first (jsonschema's best_match): its message and where it points."""
    error = best_match(validator.iter_errors(document))
    assert error is not None
    return error.message, list(error.absolute_path)


def test_schema_has_a_stable_id_that_documents_name(registry: NodeRegistry) -> None:
    schema = document_schema(registry)

    assert schema["$id"] == SCHEMA_ID == "https://graphflow.dev/schema/graph-1.json"
    assert VALID["$schema"] == SCHEMA_ID


@pytest.mark.parametrize(("document", "message", "where"), [
    pytest.param(changed(("nodes", "edges", "inputs", "radius"), 3),
                 "Additional properties are not allowed ('radius' was unexpected)", ["nodes", "edges", "inputs"],
                 id="unknown-input"),
    pytest.param(changed(("nodes", "edges", "inputs", "low"), 300),
                 "300 is greater than the maximum of 255", ["nodes", "edges", "inputs", "low"], id="out-of-range"),
    pytest.param(changed(("nodes", "half", "inputs", "op"), "pow"),
                 "'pow' is not one of ['add', 'sub', 'mul', 'div', 'min', 'max']", ["nodes", "half", "inputs", "op"],
                 id="enum-violation"),
    pytest.param(without(("nodes", "edges", "inputs", "image")),
                 "'image' is a required property", ["nodes", "edges", "inputs"], id="missing-required-input"),
    pytest.param(changed(("nodes", "edges", "colour"), "red"),
                 "Additional properties are not allowed ('colour' was unexpected)", ["nodes", "edges"],
                 id="unknown-node-key"),
    pytest.param(changed(("nodes", "overlay"), {"template": "t.json", "type": "Int"}),
                 "Additional properties are not allowed ('type' was unexpected)", ["nodes", "overlay"],
                 id="template-and-type"),
    pytest.param(changed(("nodes", "overlay"), {"inputs": {}}),
                 "'type' is a required property", ["nodes", "overlay"], id="neither-type-nor-template"),
])
def test_errors_come_from_the_named_node_types_branch(
    validator: jsonschema.Draft202012Validator, document: dict[str, Any], message: str, where: list[Any]
) -> None:
    assert first_error(validator, document) == (message, where)


def test_an_unknown_node_type_is_reported_with_the_known_ones(validator: jsonschema.Draft202012Validator) -> None:
    message, where = first_error(validator, changed(("nodes", "edges", "type"), "Cany"))

    assert message.startswith("'Cany' is not one of [") and "'Canny'" in message
    assert where == ["nodes", "edges", "type"]


def test_only_the_named_type_is_checked(validator: jsonschema.Draft202012Validator) -> None:
    # "radius" is an input of no node type, "low" of Canny: under Canny, only "radius" is wrong
    errors = list(validator.iter_errors(changed(("nodes", "edges", "inputs", "radius"), 3)))

    assert [error.message for error in errors] == ["Additional properties are not allowed ('radius' was unexpected)"]


def test_inputs_may_be_left_out_exactly_when_validation_allows_it(
    validator: jsonschema.Draft202012Validator, registry: NodeRegistry
) -> None:
    no_inputs = changed(("nodes", "two"), {"type": "Int"})
    no_required = without(("nodes", "photo", "inputs"))

    assert validator.is_valid(no_inputs) and validate_document(no_inputs, registry) == []
    assert first_error(validator, no_required) == ("'inputs' is a required property", ["nodes", "photo"])
    assert validate_document(no_required, registry) != []


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda path: path.name)
def test_each_template_param_is_checked_against_its_type(
    validator: jsonschema.Draft202012Validator, path: Path
) -> None:
    template = json.loads(path.read_text(encoding="utf-8"))
    assert template["params"] and validator.is_valid(template)

    for name, declaration in template["params"].items():
        wrong = copy.deepcopy(template)
        # a default of the wrong kind: text for a number or image, a number for text
        wrong["params"][name]["default"] = 1 if declaration["type"] == "STRING" else "one"

        message, where = first_error(validator, wrong)
        assert where[:2] == ["params", name], message


@pytest.mark.parametrize(("declaration", "message", "where"), [
    pytest.param({"type": "INT", "default": "3"}, "'3' is not of type 'integer'", ["default"], id="default-type"),
    pytest.param({"type": "INT", "list": True, "default": 3}, "3 is not of type 'array'", ["default"],
                 id="list-default-not-a-list"),
    pytest.param({"type": "INT", "list": True, "default": [1, "2"]}, "'2' is not of type 'integer'",
                 ["default", 1], id="list-default-item"),
    pytest.param({"type": "FLOAT", "choices": [0.5, "x"]}, "'x' is not of type 'number'", ["choices", 1],
                 id="choice-type"),
    pytest.param({"type": "STRING", "min": 1}, "Additional properties are not allowed ('min' was unexpected)", [],
                 id="range-on-text"),
    pytest.param({"type": "IMAGE", "default": "room.png"},
                 "Additional properties are not allowed ('default' was unexpected)", [], id="default-on-image"),
])
def test_param_declarations_are_checked_by_their_type(
    validator: jsonschema.Draft202012Validator, registry: NodeRegistry, declaration: dict[str, Any], message: str,
    where: list[Any]
) -> None:
    document = changed(("params", "low"), declaration)
    document["nodes"]["edges"]["inputs"].pop("low")

    assert first_error(validator, document) == (message, ["params", "low", *where])
    assert validate_document(document, registry) != []  # validation refuses them too


def test_list_params_with_list_defaults_pass(validator: jsonschema.Draft202012Validator) -> None:
    document = changed(("params", "seeds"), {"type": "INT", "list": True, "default": [1, 2], "choices": [1, 2, 3]})

    assert list(validator.iter_errors(document)) == []
