"""The JSON Schema of documents: a valid draft 2020-12 schema that accepts good documents and rejects bad ones."""

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from graphflow import default_registry
from graphflow.registry import NodeRegistry
from graphflow.schema import document_schema
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
