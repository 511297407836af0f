"""Attacks on list-typed params: incremental recompiles, templates used as nodes (links, lists of links, params
passed through, nested), unbound list params when checking a template, the schema, canonical saves, the command
line, and generated documents that must fail with coded errors, never a traceback."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphflow import Engine, Graph, ValidationError, default_registry, dumps, parse_document, save_document
from graphflow.cli import main
from graphflow.document import MAX_VALUES
from graphflow.schema import document_schema
from graphflow.templates import parse_assignments
from graphflow.validation import compile_document

REGISTRY = default_registry()
WORDS = {"words": {"type": "STRING", "list": True, "default": ["a", "b"]}}
REQUIRED_WORDS = {"words": {"type": "STRING", "list": True}}


def join(texts: Any) -> dict[str, Any]:
    return {"join": {"type": "JoinText", "inputs": {"texts": texts, "separator": "-"}}}


def document(params: dict, nodes: dict, outputs: dict | None = None, name: str | None = None) -> dict[str, Any]:
    named = {"name": name} if name is not None else {}
    return {"graphflow": 1, **named, "params": params, "nodes": nodes,
            "outputs": {"text": "join.text"} if outputs is None else outputs}


def errors_of(call: Any) -> list[tuple[str, str | None, str | None]]:
    with pytest.raises(ValidationError) as caught:
        call()
    return [(error.code, error.node, error.input) for error in caught.value.errors]


# -- incremental recompiles --------------------------------------------------------------------------------------------

def test_a_changed_list_default_reruns_the_nodes_using_it_whole_or_spliced() -> None:
    engine = Engine()
    nodes = {**join(["<", {"param": "words"}, ">"]),
             "whole": {"type": "JoinText", "inputs": {"texts": {"param": "words"}}},
             "other": {"type": "JoinText", "inputs": {"texts": ["fixed"]}}}
    outputs = {"text": "join.text", "whole": "whole.text", "other": "other.text"}
    first = engine.run(document(WORDS, nodes, outputs, name="edited"))
    assert first.outputs == {"text": "<-a-b->", "whole": "a, b", "other": "fixed"}
    edited = document({"words": {"type": "STRING", "list": True, "default": ["a", "b", "c"]}}, nodes, outputs,
                      name="edited")
    second = engine.run(edited)
    assert second.outputs == {"text": "<-a-b-c->", "whole": "a, b, c", "other": "fixed"}
    assert sorted(second.ran) == ["join", "whole"] and second.cached == ["other"]
    given = engine.run(edited, {"words": ["z"]})
    assert given.outputs["text"] == "<-z->" and sorted(given.ran) == ["join", "whole"]


def test_a_param_turned_into_a_list_is_checked_again_at_a_node_kept_from_the_last_compile() -> None:
    engine = Engine()
    nodes = {"n": {"type": "Int", "inputs": {"value": {"param": "p"}}},
             "j": {"type": "JoinText", "inputs": {"texts": ["x", {"param": "w"}]}}}
    outputs = {"v": "n.value", "t": "j.text"}
    scalar = {"p": {"type": "INT", "default": 1}, "w": {"type": "STRING", "default": "y"}}
    assert engine.run(document(scalar, nodes, outputs, name="flip")).outputs == {"v": 1, "t": "x, y"}
    listed = {"p": {"type": "INT", "list": True, "default": [1]}, "w": {"type": "STRING", "list": True,
                                                                        "default": ["y", "z"]}}
    assert errors_of(lambda: engine.compile(document(listed, nodes, outputs, name="flip"))) == [
        ("type_mismatch", "n", "value")]
    fixed = document({**scalar, "w": listed["w"]}, nodes, outputs, name="flip")
    result = engine.run(fixed)
    assert result.outputs == {"v": 1, "t": "x, y, z"} and result.ran == ["j"]
    assert engine.run(document(scalar, nodes, outputs, name="flip")).outputs["t"] == "x, y"  # and back


# -- templates used as nodes -------------------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path: Path) -> Path:
    save_document(document(WORDS, join({"param": "words"})), tmp_path / "join.json")
    save_document(document(REQUIRED_WORDS, join({"param": "words"})), tmp_path / "required.json")
    save_document(document({"middle": {"type": "STRING", "list": True, "default": ["m"]}},
                           {"inner": {"template": "join.json", "inputs": {"words": ["pre", {"param": "middle"}]}}},
                           {"text": "inner.text"}), tmp_path / "nested.json")
    return tmp_path


def outer(folder: Path, template: str, inputs: dict, params: dict | None = None) -> Path:
    nodes = {"s": {"type": "String", "inputs": {"value": "S"}}, "t": {"type": "String", "inputs": {"value": "T"}},
             "use": {"template": template, "inputs": inputs}}
    path = folder / "outer.json"
    save_document(document(params or {}, nodes, {"text": "use.text"}), path)
    return path


OUTER_WORDS = {"ws": {"type": "STRING", "list": True, "default": ["m", "n"]}}


@pytest.mark.parametrize(("template", "inputs", "params", "expected"), [
    ("join.json", {"words": {"from": "s.value"}}, None, "S"),  # one link: a list of one
    ("join.json", {"words": [{"from": "s.value"}, "x", {"from": "t.value"}]}, None, "S-x-T"),
    ("join.json", {"words": "x"}, None, "x"),  # one literal: a list of one, as at any list input
    ("join.json", {"words": {"param": "ws"}}, OUTER_WORDS, "m-n"),  # the outer list param passed through
    ("join.json", {"words": ["<", {"param": "ws"}, {"from": "s.value"}]}, OUTER_WORDS, "<-m-n-S"),
    ("join.json", {"words": {"param": "w"}}, {"w": {"type": "STRING", "default": "one"}}, "one"),
    ("required.json", {"words": []}, None, ""),
    ("nested.json", {}, None, "pre-m"),
    ("nested.json", {"middle": ["u", {"from": "s.value"}]}, None, "pre-u-S"),
    ("nested.json", {"middle": {"param": "ws"}}, OUTER_WORDS, "pre-m-n"),
])
def test_a_template_node_takes_links_lists_and_list_params_for_its_list_param(
        folder: Path, template: str, inputs: dict, params: dict | None, expected: str) -> None:
    result = Engine(input_dirs=[folder]).run(outer(folder, template, inputs, params))
    assert result.outputs["text"] == expected


def test_a_template_node_refuses_a_list_param_of_another_type_and_bad_items_inside(folder: Path) -> None:
    engine = Engine(input_dirs=[folder])
    ints = outer(folder, "join.json", {"words": {"param": "ns"}}, {"ns": {"type": "INT", "list": True,
                                                                         "default": [1]}})
    assert errors_of(lambda: engine.compile(ints)) == [("type_mismatch", "use", "words")]
    bad_item = outer(folder, "nested.json", {"middle": ["u", 2]})
    assert errors_of(lambda: engine.compile(bad_item)) == [("invalid_value", "use", "middle")]


def test_an_unbound_outer_list_param_passed_to_a_template_is_reported_once(folder: Path) -> None:
    """Bug (fixed): the template's own param was reported missing too, with a misleading "--set" hint."""
    engine = Engine(input_dirs=[folder])
    for inputs in ({"words": {"param": "ws"}}, {"words": ["<", {"param": "ws"}]}):
        path = outer(folder, "required.json", inputs, {"ws": {"type": "STRING", "list": True}})
        assert errors_of(lambda path=path: engine.compile(path)) == [("missing_param_value", None, "ws")]
        assert engine.run(path, {"ws": ["g", "h"]}).outputs["text"] == ("g-h" if "param" in inputs["words"]
                                                                         else "<-g-h")


@pytest.mark.parametrize("inputs", [{"words": ["<", {"param": "ws"}]}, {"words": {"param": "ws"}},
                                    {"words": {"param": "w"}}, {"words": ["<", {"param": "w"}]}])
def test_checking_a_template_that_hands_its_unbound_params_to_a_template_node_finds_no_problem(
        folder: Path, inputs: dict) -> None:
    """Bug (fixed): an unbound param spliced into a list (or a scalar one at a list input) went in as None, and
    the template node's check refused it ("this input takes STRING or a list of them")."""
    params = {"ws": {"type": "STRING", "list": True}, "w": {"type": "STRING"}}
    path = outer(folder, "required.json", inputs, params)
    compile_document(json.loads(path.read_text()), REGISTRY, base_dir=folder, as_template=True)
    ints = outer(folder, "required.json", {"words": ["<", {"param": "ns"}]}, {"ns": {"type": "INT", "list": True}})
    with pytest.raises(ValidationError) as caught:  # its type is still checked where it is used
        compile_document(json.loads(ints.read_text()), REGISTRY, base_dir=folder, as_template=True)
    assert caught.value.codes == ["type_mismatch"]


def test_checking_a_template_with_a_required_list_param(folder: Path) -> None:
    compile_document(json.loads((folder / "required.json").read_text()), REGISTRY, base_dir=folder,
                     as_template=True)
    nodes = {"n": {"type": "Int", "inputs": {"value": {"param": "ns"}}}}
    unusable = document({"ns": {"type": "INT", "list": True}}, nodes, {"v": "n.value"})
    assert errors_of(lambda: compile_document(unusable, REGISTRY, as_template=True)) == [("type_mismatch", "n",
                                                                                          "value")]
    assert errors_of(lambda: Engine().compile(document(REQUIRED_WORDS, join({"param": "words"})))) == [
        ("missing_param_value", None, "words")]


def test_an_edited_template_file_or_a_new_list_value_reruns_only_the_template_node(tmp_path: Path) -> None:
    def template(default: list[str]) -> None:
        save_document(document({"words": {"type": "STRING", "list": True, "default": default}},
                               join({"param": "words"})), tmp_path / "t.json")

    def outer(inputs: dict, params: dict | None = None) -> Path:
        nodes = {"use": {"template": "t.json", "inputs": inputs}, "k": {"type": "JoinText", "inputs": {"texts": ["k"]}}}
        save_document(document(params or {}, nodes, {"text": "use.text", "k": "k.text"}, name="o"),
                      tmp_path / "o.json")
        return tmp_path / "o.json"

    engine = Engine(input_dirs=[tmp_path])
    template(["a"])
    assert engine.run(outer({})).outputs["text"] == "a"
    template(["a", "b"])
    edited = engine.run(tmp_path / "o.json")
    assert edited.outputs["text"] == "a-b" and edited.ran == ["use/join"] and edited.cached == ["k"]
    path = outer({"words": {"param": "ws"}}, {"ws": {"type": "STRING", "list": True, "default": ["p"]}})
    for values, expected in (({}, "p"), ({"ws": ["q", "r"]}, "q-r"), ({"ws": []}, "")):
        result = engine.run(path, values)
        assert (result.outputs["text"], result.ran, result.cached) == (expected, ["use/join"], ["k"])


def test_a_graph_loaded_into_the_builder_keeps_its_list_params() -> None:
    graph = Graph.from_document(SEEDS_DOCUMENT)
    assert dumps(graph.to_document()) == dumps(SEEDS_DOCUMENT)
    assert Engine().run(graph, {"words": ["w"]}).outputs["text"] == "<, w, >"


def test_the_builder_declares_a_list_param() -> None:
    graph = Graph("seeds")
    words = graph.param("words", "STRING", ["a", "b"], list=True)
    graph.output("text", graph.add(REGISTRY.get("JoinText")(texts=words), "join").text)
    assert Engine().run(graph, {"words": ["x", "y"]}).outputs["text"] == "x, y"


# -- values, limits and item types -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "code"), [
    ([["a"]], "invalid_value"), ([{"param": "words"}], "invalid_value"), ([{"from": "join.text"}], "invalid_value"),
    ([1], "invalid_value"), ("a", "invalid_value"), ([None], "invalid_value"), (("a",), "invalid_document"),
])
def test_given_list_values_of_the_wrong_shape_or_item_type_are_refused(value: Any, code: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Engine().compile(document(WORDS, join({"param": "words"})), {"words": value})
    assert caught.value.codes == [code] and caught.value.errors[0].input in ("words", "params")


@pytest.mark.parametrize("default", [[1, True], [1, 2.0], [[1]], [1, None], [1, "2"]])
def test_list_defaults_with_an_item_of_another_type_are_refused(default: list) -> None:
    bad = document({"seeds": {"type": "INT", "list": True, "default": default}}, {}, {})
    assert errors_of(lambda: Engine().compile(bad)) == [("invalid_param", None, "seeds")]


def test_a_list_of_a_million_values_is_refused_and_one_just_under_is_accepted() -> None:
    graph = document({"ns": {"type": "INT", "list": True, "default": [0]}}, join(["x"]))
    with pytest.raises(ValidationError) as caught:
        Engine().compile(graph, {"ns": list(range(MAX_VALUES))})
    assert caught.value.codes == ["invalid_document"]
    assert Engine().compile(graph, {"ns": list(range(MAX_VALUES - 10))}).params["ns"][-1] == MAX_VALUES - 11
    text = json.dumps(document({"ns": {"type": "INT", "list": True, "default": list(range(MAX_VALUES))}}, {}, {}))
    with pytest.raises(ValidationError) as caught:
        parse_document(text)
    assert caught.value.codes == ["invalid_document"]


def test_command_line_lists_keep_json_types_and_report_every_bad_item() -> None:
    params = {"seeds": {"type": "INT", "list": True, "min": 0}, "scales": {"type": "FLOAT", "list": True},
              "flags": {"type": "BOOL", "list": True}}
    graph = document(params, join(["x"]))
    values = parse_assignments(graph, ["seeds=[0, 18446744073709551615]", "scales=1,2.5", "flags=true, no"])
    assert values == {"seeds": [0, 2**64 - 1], "scales": [1.0, 2.5], "flags": [True, False]}
    assert [type(item) for item in values["scales"]] == [float, float]
    assert parse_assignments(graph, ["scales=[1, 2.5]"])["scales"] == [1, 2.5]  # JSON's own types: 1 stays INT
    for text in ("seeds=1,,2", "seeds=[1, true]", "seeds={\"a\": 1}", "seeds=1.5", "flags=maybe"):
        with pytest.raises(ValidationError) as caught:
            parse_assignments(graph, [text])
        assert caught.value.codes == ["invalid_value"], text
    with pytest.raises(ValidationError) as caught:  # read, then checked against min like any value
        Engine().compile(graph, {**values, **parse_assignments(graph, ["seeds=3,-1"])})
    assert [(error.code, error.input) for error in caught.value.errors] == [("value_out_of_range", "seeds")]


# -- schema and canonical saves ----------------------------------------------------------------------------------------

SEEDS_DOCUMENT = {
    "graphflow": 1,
    "params": {"seeds": {"type": "INT", "list": True, "default": [0, 1], "description": "noise seeds", "min": 0},
               "words": REQUIRED_WORDS["words"]},
    "nodes": {"join": {"type": "JoinText", "inputs": {"texts": ["<", {"param": "words"}, ">"]}},
              "whole": {"type": "JoinText", "inputs": {"texts": {"param": "words"}}}},
    "outputs": {"text": "join.text"},
}


def test_documents_with_list_params_match_the_schema_and_save_stably() -> None:
    schema = document_schema(REGISTRY)
    jsonschema.validate(SEEDS_DOCUMENT, schema)
    for name in ("archviz_four_seeds.json", "templates/archviz.json"):
        jsonschema.validate(json.loads((Path(__file__).parents[2] / "graphs" / name).read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document({"p": {"type": "INT", "list": "yes"}}, {}, {}), schema)
    text = dumps(SEEDS_DOCUMENT)
    assert dumps(parse_document(text)) == text
    shuffled = {"graphflow": 1, "params": {"seeds": {"min": 0, "description": "noise seeds", "default": [0, 1],
                                                     "list": True, "type": "INT"},
                                           "words": REQUIRED_WORDS["words"]},
                "nodes": SEEDS_DOCUMENT["nodes"], "outputs": SEEDS_DOCUMENT["outputs"]}
    assert dumps(shuffled) == text


def test_a_list_param_through_the_command_line_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "T.json"
    save_document(SEEDS_DOCUMENT, path)
    assert main(["run", str(path), "--set", "words=x, y", "--set", "seeds=0,1,2", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 0
    assert "'<, x,  y, >'" in capsys.readouterr().out  # comma-separated STRING items keep their spaces
    assert main(["run", str(path), "--set", "words=[\"a, b\"]", "--quiet"]) == 0
    assert "'<, a, b, >'" in capsys.readouterr().out
    assert main(["run", str(path), "--set", "words=a", "--set", "seeds=1,-2"]) == 1
    assert "[value_out_of_range] 'seeds'" in capsys.readouterr().err
    assert main(["validate", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["valid"]


def test_validate_names_a_required_list_param_as_a_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "T.json"
    save_document(SEEDS_DOCUMENT, path)
    assert main(["validate", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params_without_value"] == ["words (a list of STRING)"]


# -- generated documents -----------------------------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-3, 2**64) | st.floats(allow_nan=True)
                       | st.text(max_size=4), lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.sampled_from(["param", "from", "x"]), inner, max_size=2), max_leaves=6)
DECLARATIONS = st.fixed_dictionaries({"type": st.sampled_from(["INT", "FLOAT", "BOOL", "STRING", "IMAGE", "LIST"])},
                                     optional={"list": st.sampled_from([True, False, "true", 1, None]),
                                               "default": JSONISH, "min": st.sampled_from([0, 1.5, "0"]),
                                               "max": st.sampled_from([3, 9.5]),
                                               "choices": st.sampled_from([["a", "b"], [0, 1, 2], "ab"])})
REFERENCES = st.sampled_from([{"param": "p"}, {"param": "q"}, {"param": "missing"}, {"from": "n0.text"}, "lit", 3])
VALUES = REFERENCES | st.lists(REFERENCES, max_size=3)
FUZZ_FOLDER = Path(tempfile.mkdtemp(prefix="graphflow-fuzz-lists-"))
save_document(document(WORDS, join({"param": "words"})), FUZZ_FOLDER / "join.json")
PLACES = st.sampled_from([("JoinText", "texts"), ("Int", "value"), ("String", "value"), ("Math", "a"),
                          ("SelectText", "names"), ("template", "words")])


@FUZZ
@given(st.dictionaries(st.sampled_from(["p", "q"]), DECLARATIONS, max_size=2),
       st.lists(st.tuples(PLACES, VALUES), min_size=1, max_size=3), st.dictionaries(st.sampled_from(["p", "q", "r"]),
                                                                                    JSONISH, max_size=2),
       st.lists(st.sampled_from(["p=1,2", "q=[1, \"a\"]", "p=", "q=x", "p=[1,", "r=1"]), max_size=2),
       st.randoms(use_true_random=False))
def test_generated_documents_with_list_params_compile_or_list_coded_errors(
        params: dict, uses: list, values: dict, assignments: list, rng: random.Random) -> None:
    folder = FUZZ_FOLDER
    nodes: dict[str, Any] = {}
    for index, ((node_type, name), value) in enumerate(uses):
        nodes[f"n{index}"] = ({"template": "join.json", "inputs": {name: value}} if node_type == "template"
                              else {"type": node_type, "inputs": {name: value}})
    graph = {"graphflow": 1, "params": params, "nodes": nodes, "outputs": {}}
    for as_template in (True, False):
        try:
            compile_document(graph, REGISTRY, values, base_dir=folder, as_template=as_template)
        except ValidationError as error:
            assert error.errors and all(problem.code and problem.message for problem in error.errors)
    try:
        given = parse_assignments(graph, rng.sample(assignments, len(assignments)))
    except ValidationError as error:
        assert error.errors and all(problem.code and problem.message for problem in error.errors)
        return
    try:
        compile_document(graph, REGISTRY, given, base_dir=folder)
    except ValidationError as error:
        assert error.errors
