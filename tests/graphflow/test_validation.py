"""Validation: every problem in a document reported at once, each located and explained."""

import json
from typing import Any

import pytest

from graphflow import GraphError, ValidationError, default_registry, parse_document
from graphflow.errors import Code
from graphflow.registry import NodeRegistry
from graphflow.validation import compile_document, validate_document


@pytest.fixture(scope="module")
def registry() -> NodeRegistry:
    return default_registry()


def document(nodes: dict[str, Any], outputs: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """A document with the given nodes and named outputs (none by default)."""
    return {"graphflow": 1, **extra, "nodes": nodes, "outputs": outputs if outputs is not None else {}}


def photo_edges(**edge_inputs: Any) -> dict[str, Any]:
    """photo (LoadImage) -> edges (Canny) with the given Canny inputs, edges.image as the output."""
    inputs = {"image": {"from": "photo.image"}, **edge_inputs}
    return document({
        "photo": {"type": "LoadImage", "inputs": {"path": "room.png"}},
        "edges": {"type": "Canny", "inputs": inputs},
    }, {"edges": "edges.image"})


def only_error(doc: dict[str, Any], registry: NodeRegistry, params: dict[str, Any] | None = None) -> GraphError:
    errors = validate_document(doc, registry, params)
    assert len(errors) == 1, errors
    return errors[0]


def test_valid_document_compiles_in_dependency_order(registry: NodeRegistry) -> None:
    doc = document({
        "save": {"type": "SaveImage", "inputs": {"image": {"from": "edges.image"}}},
        "edges": {"type": "Canny", "inputs": {"image": {"from": "photo.image"}, "low": 50}},
        "photo": {"type": "LoadImage", "inputs": {"path": "room.png"}},
    })

    graph = compile_document(doc, registry)

    assert validate_document(doc, registry) == []
    assert graph.order == ("photo", "edges", "save")
    assert graph.output_nodes() == ["save"]
    assert graph.nodes["edges"].inputs["low"] == 50
    assert graph.nodes["edges"].inputs["high"] == 200  # the declared default fills an omitted input


def test_every_problem_is_reported_in_one_error(registry: NodeRegistry) -> None:
    doc = {
        "graphflow": 1,
        "params": {"bad": {"type": "NUMBER"}, "seed": {"type": "INT"}},
        "nodes": {
            "photo": {"type": "LoadImage", "inputs": {"path": "room.png"}},
            "edges": {"type": "Canny", "inputs": {"image": {"from": "photo.mask"}, "low": 300, "high": True, "lo": 5}},
            "blur": {"type": "Cany", "inputs": {}},
            "bad id": {"type": "Int"},
            "sum": {"type": "Math", "inputs": {"op": "pow", "b": {"from": "ghost.value"}}},
            "neg": {"type": "Math",
                    "inputs": {"a": {"from": "photo.pixels"}, "b": {"from": "x"}, "op": {"param": "nope"}}},
            "resize": {"type": "ResizePad", "inputs": {"image": "photo.png", "width": "wide"}},
        },
        "outputs": {"edges": "edges.image"},
    }

    with pytest.raises(ValidationError) as raised:
        compile_document(doc, registry, {"unused": 1})

    located = {(error.code, error.node, error.input) for error in raised.value.errors}
    assert located == {
        (Code.INVALID_PARAM, None, "bad"),
        (Code.MISSING_PARAM_VALUE, None, "seed"),
        (Code.UNKNOWN_PARAM, None, "unused"),
        (Code.UNKNOWN_NODE_TYPE, "blur", None),
        (Code.INVALID_NODE_ID, "bad id", None),
        (Code.UNKNOWN_INPUT, "edges", "lo"),
        (Code.TYPE_MISMATCH, "edges", "image"),
        (Code.VALUE_OUT_OF_RANGE, "edges", "low"),
        (Code.INVALID_VALUE, "edges", "high"),
        (Code.MISSING_REQUIRED_INPUT, "sum", "a"),
        (Code.BAD_LINK, "sum", "b"),
        (Code.VALUE_NOT_IN_CHOICES, "sum", "op"),
        (Code.BAD_LINK, "neg", "a"),
        (Code.BAD_LINK, "neg", "b"),
        (Code.UNKNOWN_PARAM, "neg", "op"),
        (Code.INVALID_VALUE, "resize", "image"),
        (Code.INVALID_VALUE, "resize", "width"),
    }
    assert len(raised.value.errors) == len(located)
    assert all(error.message and error.expected and error.found for error in raised.value.errors)
    assert str(raised.value).startswith(f"{len(located)} problems:")


def test_cycle_is_reported_alongside_other_errors(registry: NodeRegistry) -> None:
    doc = document({
        "a": {"type": "Math", "inputs": {"a": {"from": "b.result"}}},
        "b": {"type": "Math", "inputs": {"a": {"from": "a.result"}}},
        "c": {"type": "Int", "inputs": {"valu": 1}},
    }, {"result": "a.result"})

    codes = {error.code for error in validate_document(doc, registry)}

    assert codes == {Code.UNKNOWN_INPUT, Code.CYCLE}


def test_error_to_json_and_str_name_code_place_expectation_and_finding(registry: NodeRegistry) -> None:
    error = only_error(photo_edges(low=300), registry)

    assert error.to_json() == {
        "code": "value_out_of_range", "message": error.message, "node": "edges", "input": "low",
        "expected": "a value in [0, 255]", "found": "300",
    }
    json.dumps(error.to_json())  # plain JSON data, for `graphflow validate --json`
    text = str(error)
    assert text.startswith("[value_out_of_range] node 'edges', input 'low': ")
    assert "a value in [0, 255]" in text and "300" in text


def test_invalid_json_is_a_validation_error_with_position() -> None:
    with pytest.raises(ValidationError) as raised:
        parse_document('{"graphflow": 1, "nodes": }')

    assert raised.value.codes == ["invalid_json"]
    assert "line 1, column 27" in raised.value.errors[0].message


def test_unsupported_version_is_a_validation_error() -> None:
    with pytest.raises(ValidationError) as raised:
        parse_document('{"graphflow": 99, "nodes": {}}')

    assert raised.value.codes == ["unsupported_version"]


def test_unknown_node_type_suggests_the_closest_name(registry: NodeRegistry) -> None:
    error = only_error(document({"edges": {"type": "Cany", "inputs": {}}}, {"e": "edges.image"}), registry)

    assert (error.code, error.node, error.found) == (Code.UNKNOWN_NODE_TYPE, "edges", "'Cany'")
    assert "did you mean 'Canny'?" in error.message


def test_unknown_node_type_without_a_close_name_asks_about_plugins(registry: NodeRegistry) -> None:
    error = only_error(document({"k": {"type": "KSamplerAdvanced"}}, {"e": "k.latent"}), registry)

    assert error.code == Code.UNKNOWN_NODE_TYPE
    assert "plugin" in error.message


def test_unknown_input_names_the_known_inputs_and_the_closest(registry: NodeRegistry) -> None:
    error = only_error(photo_edges(lo=5), registry)

    assert (error.code, error.node, error.input) == (Code.UNKNOWN_INPUT, "edges", "lo")
    assert "did you mean 'low'?" in error.message
    assert error.expected is not None and all(name in error.expected for name in ("image", "low", "high"))


def test_missing_required_input_says_what_type_is_needed(registry: NodeRegistry) -> None:
    doc = document({"edges": {"type": "Canny", "inputs": {"low": 10}}}, {"e": "edges.image"})

    error = only_error(doc, registry)

    assert (error.code, error.node, error.input, error.found) == (Code.MISSING_REQUIRED_INPUT, "edges", "image",
                                                                   "nothing")
    assert error.expected is not None and "IMAGE" in error.expected


@pytest.mark.parametrize(("link", "expected_fragment"), [
    ("ghost.image", "an existing node id"),
    ("photo.pixels", "image, mask"),
    ("photo", '"node.output"'),
    ("photo.image.red", '"node.output"'),
    (".image", '"node.output"'),
])
def test_bad_link_is_reported_on_the_input_that_uses_it(registry: NodeRegistry, link: str,
                                                        expected_fragment: str) -> None:
    error = only_error(photo_edges(image={"from": link}), registry)

    assert (error.code, error.node, error.input, error.found) == (Code.BAD_LINK, "edges", "image", repr(link))
    assert error.expected is not None and expected_fragment in error.expected


def test_bad_link_in_graph_outputs_is_reported(registry: NodeRegistry) -> None:
    doc = photo_edges()
    doc["outputs"] = {"edges": "edges.pixels"}

    error = only_error(doc, registry)

    assert (error.code, error.node, error.input) == (Code.BAD_LINK, None, "edges")


def test_image_output_into_mask_input_is_a_type_mismatch(registry: NodeRegistry) -> None:
    doc = document({
        "photo": {"type": "LoadImage", "inputs": {"path": "room.png"}},
        "inverted": {"type": "InvertMask", "inputs": {"mask": {"from": "photo.image"}}},
    }, {"mask": "inverted.mask"})

    error = only_error(doc, registry)

    assert (error.code, error.node, error.input) == (Code.TYPE_MISMATCH, "inverted", "mask")
    assert error.expected == "MASK"
    assert error.found is not None and "IMAGE" in error.found and "photo.image" in error.found


def test_int_output_widens_into_a_float_input(registry: NodeRegistry) -> None:
    doc = document({
        "two": {"type": "Int", "inputs": {"value": 2}},
        "sum": {"type": "Math", "inputs": {"a": {"from": "two.value"}, "b": 1}},
    }, {"sum": "sum.result"})

    assert validate_document(doc, registry) == []


def test_float_output_into_an_int_input_is_a_type_mismatch(registry: NodeRegistry) -> None:
    doc = photo_edges(low={"from": "half.value"})
    doc["nodes"]["half"] = {"type": "Float", "inputs": {"value": 0.5}}

    error = only_error(doc, registry)

    assert (error.code, error.node, error.input, error.expected) == (Code.TYPE_MISMATCH, "edges", "low", "INT")


@pytest.mark.parametrize(("inputs", "input_name", "found"), [
    ({"low": "100"}, "low", "string '100'"),
    ({"low": True}, "low", "boolean True"),
    ({"low": 100.0}, "low", "number 100.0"),
    ({"low": None}, "low", "null None"),
    ({"low": [100]}, "low", "list [100]"),
    ({"low": {"value": 100}}, "low", "object {'value': 100}"),
    ({"image": "room.png"}, "image", "string 'room.png'"),
])
def test_literal_of_the_wrong_kind_is_an_invalid_value(registry: NodeRegistry, inputs: dict[str, Any],
                                                       input_name: str, found: str) -> None:
    error = only_error(photo_edges(**inputs), registry)

    assert (error.code, error.node, error.input, error.found) == (Code.INVALID_VALUE, "edges", input_name, found)


def test_literal_for_an_image_input_asks_for_a_link(registry: NodeRegistry) -> None:
    error = only_error(photo_edges(image="room.png"), registry)

    assert '{"from": "node.output"}' in error.message
    assert error.expected is not None and "link" in error.expected


def test_bool_is_not_an_int(registry: NodeRegistry) -> None:
    doc = document({"flag": {"type": "Int", "inputs": {"value": False}}}, {"v": "flag.value"})

    assert only_error(doc, registry).code == Code.INVALID_VALUE


@pytest.mark.parametrize(("value", "valid"), [(0, True), (255, True), (-1, False), (256, False)])
def test_range_bounds_are_inclusive(registry: NodeRegistry, value: int, valid: bool) -> None:
    errors = validate_document(photo_edges(high=value), registry)

    assert [error.code for error in errors] == ([] if valid else [Code.VALUE_OUT_OF_RANGE])


def test_value_not_in_choices_lists_the_choices(registry: NodeRegistry) -> None:
    doc = document({"sum": {"type": "Math", "inputs": {"a": 1.0, "op": "pow"}}}, {"r": "sum.result"})

    error = only_error(doc, registry)

    assert (error.code, error.node, error.input, error.found) == (Code.VALUE_NOT_IN_CHOICES, "sum", "op", "'pow'")
    assert error.expected is not None and "'add'" in error.expected and "'max'" in error.expected


def test_cycle_names_every_node_on_it(registry: NodeRegistry) -> None:
    doc = document({
        "a": {"type": "Math", "inputs": {"a": {"from": "c.result"}}},
        "b": {"type": "Math", "inputs": {"a": {"from": "a.result"}}},
        "c": {"type": "Math", "inputs": {"a": {"from": "b.result"}}},
        "free": {"type": "Int"},
    }, {"result": "c.result"})

    error = only_error(doc, registry)

    assert error.code == Code.CYCLE
    assert error.found in {"a -> b -> c -> a", "b -> c -> a -> b", "c -> a -> b -> c"}
    assert error.found in error.message
    assert error.node in {"a", "b", "c"}


def test_self_loop_is_a_cycle(registry: NodeRegistry) -> None:
    doc = document({"loop": {"type": "Math", "inputs": {"a": 1.0, "b": {"from": "loop.result"}}}},
                   {"result": "loop.result"})

    error = only_error(doc, registry)

    assert (error.code, error.node, error.found) == (Code.CYCLE, "loop", "loop -> loop")


def test_two_separate_cycles_are_both_reported(registry: NodeRegistry) -> None:
    doc = document({
        "a": {"type": "Math", "inputs": {"a": {"from": "b.result"}}},
        "b": {"type": "Math", "inputs": {"a": {"from": "a.result"}}},
        "x": {"type": "Math", "inputs": {"a": {"from": "x.result"}}},
    }, {"result": "a.result"})

    errors = validate_document(doc, registry)

    assert [error.code for error in errors] == [Code.CYCLE, Code.CYCLE]
    assert {frozenset((error.found or "").split(" -> ")) for error in errors} == {frozenset("ab"), frozenset("x")}


def test_document_without_outputs_or_output_nodes_is_no_outputs(registry: NodeRegistry) -> None:
    error = only_error(document({"two": {"type": "Int", "inputs": {"value": 2}}}), registry)

    assert error.code == Code.NO_OUTPUTS
    assert "SaveImage" in error.message


def test_output_node_alone_is_enough(registry: NodeRegistry) -> None:
    doc = document({
        "photo": {"type": "LoadImage", "inputs": {"path": "room.png"}},
        "save": {"type": "SaveImage", "inputs": {"image": {"from": "photo.image"}}},
    })

    assert validate_document(doc, registry) == []


@pytest.mark.parametrize("node_id", ["bad id", "a.b", "-leading-dash", "", "ünïcode"])
def test_invalid_node_id_is_rejected(registry: NodeRegistry, node_id: str) -> None:
    doc = document({node_id: {"type": "Int"}, "ok": {"type": "Int"}}, {"v": "ok.value"})

    error = only_error(doc, registry)

    assert (error.code, error.node, error.found) == (Code.INVALID_NODE_ID, node_id, repr(node_id))


@pytest.mark.parametrize("node_id", ["photo", "Photo_2", "_private", "with-dash", "3d"])
def test_valid_node_ids_are_accepted(registry: NodeRegistry, node_id: str) -> None:
    doc = document({node_id: {"type": "Int"}}, {"v": f"{node_id}.value"})

    assert validate_document(doc, registry) == []


@pytest.mark.parametrize("entry", [
    {"inputs": {}},
    {"type": "Int", "template": "t.json"},
    "Int",
    {"type": "Int", "colour": "red"},
    {"type": "Int", "inputs": [1]},
])
def test_malformed_node_entry_is_an_invalid_document(registry: NodeRegistry, entry: Any) -> None:
    doc = document({"n": entry, "ok": {"type": "Int"}}, {"v": "ok.value"})

    error = only_error(doc, registry)

    assert (error.code, error.node) == (Code.INVALID_DOCUMENT, "n")


def test_object_that_is_neither_link_nor_param_is_invalid(registry: NodeRegistry) -> None:
    error = only_error(photo_edges(image={"from": "photo.image", "extra": 1}), registry)

    assert (error.code, error.node, error.input) == (Code.INVALID_VALUE, "edges", "image")


def test_incompatible_pinned_node_version_is_unsupported(registry: NodeRegistry) -> None:
    doc = photo_edges()
    doc["nodes"]["edges"]["version"] = "2.0.0"

    error = only_error(doc, registry)

    assert (error.code, error.node, error.input, error.found) == (Code.UNSUPPORTED_VERSION, "edges", "version",
                                                                   "2.0.0")


def test_compatible_pinned_node_version_is_accepted(registry: NodeRegistry) -> None:
    doc = photo_edges()
    doc["nodes"]["edges"]["version"] = "1.4.0"

    assert validate_document(doc, registry) == []


# Params


def low_param_document(**declaration: Any) -> dict[str, Any]:
    doc = photo_edges(low={"param": "low"})
    doc["params"] = {"low": {"type": "INT", **declaration}}
    return doc


def test_param_default_is_used_and_typed(registry: NodeRegistry) -> None:
    graph = compile_document(low_param_document(default=42), registry)

    assert graph.params == {"low": 42}
    assert graph.nodes["edges"].inputs["low"] == 42


def test_param_value_overrides_the_default(registry: NodeRegistry) -> None:
    graph = compile_document(low_param_document(default=42), registry, {"low": 7})

    assert graph.params == {"low": 7}
    assert graph.nodes["edges"].inputs["low"] == 7


def test_out_of_range_param_value_is_reported_on_the_node_that_uses_it(registry: NodeRegistry) -> None:
    error = only_error(low_param_document(default=42), registry, {"low": 300})

    assert (error.code, error.node, error.input, error.found) == (Code.VALUE_OUT_OF_RANGE, "edges", "low", "300")


def test_param_value_outside_the_params_own_range_is_reported(registry: NodeRegistry) -> None:
    error = only_error(low_param_document(default=42, min=10, max=50), registry, {"low": 60})

    assert (error.code, error.input, error.found) == (Code.VALUE_OUT_OF_RANGE, "low", "60")


def test_param_value_of_the_wrong_type_is_invalid(registry: NodeRegistry) -> None:
    errors = validate_document(low_param_document(default=42), registry, {"low": "many"})

    assert errors and {error.code for error in errors} == {Code.INVALID_VALUE}


def test_unknown_param_value_is_unknown_param_with_suggestion(registry: NodeRegistry) -> None:
    error = only_error(low_param_document(default=42), registry, {"lo": 7})

    assert (error.code, error.input) == (Code.UNKNOWN_PARAM, "lo")
    assert "did you mean 'low'?" in error.message


def test_reference_to_an_undeclared_param_is_unknown_param(registry: NodeRegistry) -> None:
    error = only_error(photo_edges(low={"param": "low"}), registry)

    assert (error.code, error.node, error.input) == (Code.UNKNOWN_PARAM, "edges", "low")


def test_param_without_default_or_value_is_missing_param_value(registry: NodeRegistry) -> None:
    doc = low_param_document()

    error = only_error(doc, registry)

    assert (error.code, error.input, error.found) == (Code.MISSING_PARAM_VALUE, "low", "nothing")
    assert compile_document(doc, registry, {"low": 9}).nodes["edges"].inputs["low"] == 9


@pytest.mark.parametrize("declaration", [
    {"type": "NUMBER"},
    {"default": 1},
    {"type": "INT", "default": "one"},
    {"type": "INT", "default": 300, "max": 255},
    {"type": "STRING", "default": "c", "choices": ["a", "b"]},
    {"type": "INT", "colour": "red"},
    "INT",
])
def test_malformed_param_declaration_is_invalid_param(registry: NodeRegistry, declaration: Any) -> None:
    doc = photo_edges()
    doc["params"] = {"p": declaration}

    error = only_error(doc, registry)

    assert (error.code, error.input) == (Code.INVALID_PARAM, "p")


def test_float_param_into_an_int_input_is_a_type_mismatch(registry: NodeRegistry) -> None:
    doc = photo_edges(low={"param": "low"})
    doc["params"] = {"low": {"type": "FLOAT", "default": 100}}

    error = only_error(doc, registry)

    assert (error.code, error.node, error.input) == (Code.TYPE_MISMATCH, "edges", "low")


def test_int_param_into_a_float_input_is_accepted(registry: NodeRegistry) -> None:
    doc = document({"sum": {"type": "Math", "inputs": {"a": {"param": "a"}}}}, {"r": "sum.result"},
                   params={"a": {"type": "INT", "default": 3}})

    assert compile_document(doc, registry).nodes["sum"].inputs["a"] == 3


def test_a_misspelt_top_level_key_is_reported() -> None:
    document = {"graphflow": 1, "nodes": {"n": {"type": "Int", "inputs": {"value": 1}}}, "ouputs": {"x": "n.value"}}
    errors = validate_document(document, default_registry())
    # no_outputs would only repeat the cause, so it is reported only when nothing else is wrong
    assert [(error.code, error.input) for error in errors] == [("invalid_document", "ouputs")]
    assert "did you mean 'outputs'?" in errors[0].message
