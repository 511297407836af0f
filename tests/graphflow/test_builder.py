"""The Python builder: typed handles, errors at the call, and the same JSON as a hand-written file."""

from pathlib import Path
from typing import Any

import pytest

from graphflow import Graph, ValidationError, default_registry, load_document, parse_document
from graphflow.validation import compile_document
from nodes import Canny, Float, Int, InvertMask, LoadImage, MaskBlend, Math, SaveImage

CANNY_JSON = """\
{
  "graphflow": 1,
  "name": "canny",
  "description": "Photo -> Canny edges",
  "params": {
    "low": {"type": "INT", "default": 100, "description": "lower threshold"}
  },
  "nodes": {
    "img": {"type": "LoadImage", "inputs": {"path": "room.png"}},
    "edges": {"type": "Canny", "inputs": {"image": {"from": "img.image"}, "low": {"param": "low"}}},
    "save": {"type": "SaveImage", "inputs": {"image": {"from": "edges.image"}, "prefix": "edges"}}
  },
  "outputs": {"edges": "edges.image"}
}
"""


def build_canny() -> Graph:
    g = Graph("canny", "Photo -> Canny edges")
    low = g.param("low", "INT", 100, "lower threshold")
    photo = g.add(LoadImage(path="room.png"), "img")
    edges = g.add(Canny(image=photo.image, low=low), "edges")
    g.add(SaveImage(image=edges.image, prefix="edges"), "save")
    g.output("edges", edges.image)
    return g


def test_save_writes_the_same_bytes_as_the_hand_written_file(tmp_path: Path) -> None:
    path = tmp_path / "canny.json"

    build_canny().save(path)

    assert path.read_text(encoding="utf-8") == CANNY_JSON
    assert build_canny().dumps() == CANNY_JSON


def test_built_graph_compiles_with_param_values() -> None:
    graph = compile_document(build_canny().to_document(), default_registry(), {"low": 30})

    assert graph.order == ("img", "edges", "save")
    assert graph.nodes["edges"].inputs["low"] == 30


def test_inputs_are_written_in_the_order_they_were_given() -> None:
    # as in a hand-written document: loading one and saving it again keeps its input order
    g = Graph()
    g.add(Math(op="mul", b=2.0, a=1.0), "m")
    g.output("r", g["m"].result)

    assert '"m": {"type": "Math", "inputs": {"op": "mul", "b": 2.0, "a": 1.0}}' in g.dumps()
    assert Graph.from_document(g.to_document()).dumps() == g.dumps()


def test_handles_are_typed_by_the_output_they_name() -> None:
    photo = LoadImage(path="room.png")

    assert (photo.image.name, photo.image.type, photo.image.node) == ("image", "IMAGE", photo)
    assert photo["mask"].type == "MASK"


def test_unknown_output_attribute_lists_the_outputs() -> None:
    with pytest.raises(AttributeError, match="image"):
        _ = LoadImage(path="room.png").pixels


def test_unknown_input_fails_at_the_call() -> None:
    photo = LoadImage(path="room.png")

    with pytest.raises(ValidationError) as raised:
        Canny(image=photo.image, lo=50)

    assert raised.value.codes == ["unknown_input"]
    error = raised.value.errors[0]
    assert (error.node, error.input) == ("Canny", "lo")
    assert "did you mean 'low'?" in error.message


def test_wrong_handle_type_fails_at_the_call() -> None:
    photo = LoadImage(path="room.png")

    with pytest.raises(ValidationError) as raised:
        Canny(image=photo.mask)

    assert raised.value.codes == ["type_mismatch"]
    error = raised.value.errors[0]
    assert (error.input, error.expected) == ("image", "IMAGE")
    assert error.found is not None and "MASK" in error.found and "LoadImage.mask" in error.found


def test_int_handle_widens_into_a_float_input() -> None:
    math = Math(a=Int(value=2).value)

    assert math.values["a"].type == "INT"


def test_float_handle_into_an_int_input_fails_at_the_call() -> None:
    with pytest.raises(ValidationError) as raised:
        Canny(image=LoadImage(path="room.png").image, low=Float(value=1.0).value)

    assert raised.value.codes == ["type_mismatch"]


def test_out_of_range_literal_fails_at_the_call() -> None:
    with pytest.raises(ValidationError) as raised:
        Canny(image=LoadImage(path="room.png").image, low=300)

    assert raised.value.codes == ["value_out_of_range"]
    assert (raised.value.errors[0].input, raised.value.errors[0].found) == ("low", "300")


@pytest.mark.parametrize(("arguments", "code"), [
    ({"a": 1.0, "op": "pow"}, "value_not_in_choices"),
    ({"a": "one"}, "invalid_value"),
    ({"a": True}, "invalid_value"),
])
def test_bad_literal_fails_at_the_call(arguments: dict[str, Any], code: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Math(**arguments)

    assert raised.value.codes == [code]


def test_bool_is_not_an_int_at_the_call() -> None:
    with pytest.raises(ValidationError) as raised:
        Int(value=True)

    assert raised.value.codes == ["invalid_value"]


def test_literal_for_an_image_input_fails_at_the_call() -> None:
    with pytest.raises(ValidationError) as raised:
        InvertMask(mask="mask.png")

    assert raised.value.codes == ["invalid_value"]
    assert "link" in raised.value.errors[0].message


def test_every_problem_of_a_call_is_reported_together() -> None:
    photo = LoadImage(path="room.png")

    with pytest.raises(ValidationError) as raised:
        Canny(image=photo.mask, low=300, lo=1)

    assert sorted(raised.value.codes) == ["type_mismatch", "unknown_input", "value_out_of_range"]


def test_missing_required_input_fails_at_add() -> None:
    g = Graph()
    edges = Canny(low=50)

    with pytest.raises(ValidationError) as raised:
        g.add(edges, "edges")

    assert raised.value.codes == ["missing_required_input"]
    assert (raised.value.errors[0].node, raised.value.errors[0].input) == ("edges", "image")
    assert "edges" not in g


def test_auto_ids_are_snake_case_of_the_type_with_numeric_suffixes() -> None:
    g = Graph()
    first, second, third = (g.add(LoadImage(path=f"{n}.png")) for n in range(3))
    blend = g.add(MaskBlend(background=first.image, foreground=second.image, mask=third.mask))

    assert [g.id_of(node) for node in (first, second, third, blend)] == [
        "load_image", "load_image_2", "load_image_3", "mask_blend"]


def test_duplicate_node_id_is_rejected() -> None:
    g = Graph()
    g.add(Int(value=1), "n")

    with pytest.raises(ValidationError) as raised:
        g.add(Int(value=2), "n")

    assert raised.value.codes == ["invalid_node_id"]
    assert raised.value.errors[0].node == "n"
    assert g["n"].values == {"value": 1}


@pytest.mark.parametrize("node_id", ["bad id", "a.b", ""])
def test_malformed_node_id_is_rejected(node_id: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Graph().add(Int(value=1), node_id)

    assert raised.value.codes == ["invalid_node_id"]


def test_adding_the_same_node_twice_keeps_one_copy() -> None:
    g = Graph()
    node = Int(value=1)

    assert g.add(node, "one") is g.add(node, "again") is node
    assert "again" not in g and g.id_of(node) == "one"


def test_upstream_nodes_referenced_by_handles_are_added_first() -> None:
    g = Graph()
    save = g.add(SaveImage(image=Canny(image=LoadImage(path="room.png").image).image), "save")

    document = g.to_document()

    assert list(document["nodes"]) == ["load_image", "canny", "save"]
    assert document["nodes"]["canny"]["inputs"] == {"image": {"from": "load_image.image"}}
    assert g.id_of(save) == "save"
    assert compile_document(document, default_registry()).order == ("load_image", "canny", "save")


def test_output_adds_its_node_when_needed() -> None:
    g = Graph()
    total = Math(a=Int(value=2).value, b=3.0)

    g.output("total", total.result)

    assert g.to_document()["nodes"] == {
        "int": {"type": "Int", "inputs": {"value": 2}},
        "math": {"type": "Math", "inputs": {"a": {"from": "int.value"}, "b": 3.0}},
    }
    assert g.to_document()["outputs"] == {"total": "math.result"}


def test_param_ref_is_written_as_a_param_input() -> None:
    g = Graph()
    amount = g.param("amount", "FLOAT", 0.5, min=0.0, max=1.0)
    g.output("r", g.add(Math(a=amount, b=1.0)).result)

    document = g.to_document()

    assert document["params"] == {"amount": {"type": "FLOAT", "default": 0.5, "min": 0.0, "max": 1.0}}
    assert document["nodes"]["math"]["inputs"]["a"] == {"param": "amount"}
    assert compile_document(document, default_registry(), {"amount": 0.25}).nodes["math"].inputs["a"] == 0.25


def test_int_param_widens_into_a_float_input() -> None:
    g = Graph()
    count = g.param("count", "INT", 1)

    assert Math(a=count).values == {"a": count}


def test_param_of_the_wrong_type_fails_at_the_call() -> None:
    g = Graph()
    low = g.param("low", "FLOAT", 100.0)

    with pytest.raises(ValidationError) as raised:
        Canny(image=LoadImage(path="room.png").image, low=low)

    assert raised.value.codes == ["type_mismatch"]
    assert raised.value.errors[0].input == "low"


@pytest.mark.parametrize(("type_name", "options"), [
    ("NUMBER", {}),
    ("INT", {"default": 300, "max": 255}),
    ("STRING", {"default": "c", "choices": ("a", "b")}),
])
def test_malformed_param_declaration_is_invalid_param(type_name: str, options: dict[str, Any]) -> None:
    g = Graph()

    with pytest.raises(ValidationError) as raised:
        g.param("p", type_name, **options)

    assert raised.value.codes == ["invalid_param"]
    assert g.params == {}


def test_loaded_document_can_be_extended_and_saved(tmp_path: Path) -> None:
    source = tmp_path / "canny.json"
    source.write_text(CANNY_JSON, encoding="utf-8")
    extended = tmp_path / "extended.json"

    g = Graph.load(source)
    inverted = g.add(InvertMask(mask=g["img"].mask), "holes")
    g.output("holes", inverted.mask)
    g.save(extended)

    assert extended.read_text(encoding="utf-8") == """\
{
  "graphflow": 1,
  "name": "canny",
  "description": "Photo -> Canny edges",
  "params": {
    "low": {"type": "INT", "default": 100, "description": "lower threshold"}
  },
  "nodes": {
    "img": {"type": "LoadImage", "inputs": {"path": "room.png"}},
    "edges": {"type": "Canny", "inputs": {"image": {"from": "img.image"}, "low": {"param": "low"}}},
    "save": {"type": "SaveImage", "inputs": {"image": {"from": "edges.image"}, "prefix": "edges"}},
    "holes": {"type": "InvertMask", "inputs": {"mask": {"from": "img.mask"}}}
  },
  "outputs": {"edges": "edges.image", "holes": "holes.mask"}
}
"""
    assert compile_document(load_document(extended), default_registry()).order == ("img", "edges", "save", "holes")


def test_from_document_handles_are_typed() -> None:
    g = Graph.from_document(parse_document(CANNY_JSON))

    with pytest.raises(ValidationError) as raised:
        InvertMask(mask=g["img"].image)

    assert raised.value.codes == ["type_mismatch"]


def test_from_document_rejects_an_invalid_document() -> None:
    with pytest.raises(ValidationError) as raised:
        Graph.from_document(parse_document(CANNY_JSON.replace('"Canny"', '"Cany"')))

    assert raised.value.codes == ["unknown_node_type"]


def test_load_then_save_is_byte_stable_whatever_the_node_order(tmp_path: Path) -> None:
    text = """\
{
  "graphflow": 1,
  "nodes": {
    "product": {"type": "Math", "inputs": {"a": {"from": "two.value"}, "b": 3.0, "op": "mul"}},
    "three": {"type": "Int", "inputs": {"value": 3}},
    "two": {"type": "Int", "inputs": {"value": 2}}
  },
  "outputs": {"product": "product.result", "three": "three.value"}
}
"""
    source, copy = tmp_path / "graph.json", tmp_path / "copy.json"
    source.write_text(text, encoding="utf-8")

    Graph.load(source).save(copy)

    assert copy.read_text(encoding="utf-8") == text


def test_load_then_save_keeps_pinned_node_versions_and_extra_keys(tmp_path: Path) -> None:
    text = """\
{
  "$schema": "https://graphflow.dev/schema/graph-1.json",
  "graphflow": 1,
  "nodes": {
    "two": {"type": "Int", "version": "1.0.0", "inputs": {"value": 2}}
  },
  "outputs": {"two": "two.value"}
}
"""
    source, copy = tmp_path / "graph.json", tmp_path / "copy.json"
    source.write_text(text, encoding="utf-8")

    Graph.load(source).save(copy)

    assert copy.read_text(encoding="utf-8") == text



def test_node_calls_have_a_signature_for_help_and_editors() -> None:
    import inspect

    signature = inspect.signature(Canny)
    assert str(signature).startswith("(*, image: 'IMAGE', low: 'INT' = 100, high: 'INT' = 200, thresholds: 'STRING' = ")
    assert all(parameter.kind is inspect.Parameter.KEYWORD_ONLY for parameter in signature.parameters.values())


def test_a_long_chain_of_unadded_nodes_is_added_without_recursion() -> None:
    value = Int(value=1).value
    for _ in range(3000):  # deeper than Python's default recursion limit
        value = Math(a=value, b=1.0).result
    g = Graph()
    g.output("r", value)

    assert len(g.to_document()["nodes"]) == 3001
    assert list(g.to_document()["nodes"])[:3] == ["int", "math", "math_2"]
