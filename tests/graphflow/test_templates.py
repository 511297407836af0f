"""Templates: typed params from the command line and Python, and templates used as nodes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from graphflow import Engine, Graph, ValidationError, save_document
from graphflow.templates import Template, parse_assignments
from nodes import LoadImage, LoadMask, SaveImage

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
INT_NODE_FOR_TEMPLATES = {"n": {"type": "Int", "inputs": {"value": 1}}}


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A copy of graphs/ so tests may add documents beside the shipped ones."""
    shutil.copytree(GRAPHS, tmp_path / "graphs")
    return tmp_path


def engine_for(root: Path) -> Engine:
    return Engine(input_dirs=[root], output_dir=root / "out")


def write(path: Path, document: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_document(document, path)
    return path


def test_assignments_are_parsed_by_param_type() -> None:
    document = {"graphflow": 1, "params": {
        "n": {"type": "INT"}, "x": {"type": "FLOAT"}, "on": {"type": "BOOL"}, "text": {"type": "STRING"}}}
    values = parse_assignments(document, ["n=7", "x=0.25", "on=false", "text=a = b"])
    assert values == {"n": 7, "x": 0.25, "on": False, "text": "a = b"}


def test_bad_assignments_are_all_reported() -> None:
    document = {"graphflow": 1, "params": {"n": {"type": "INT"}, "on": {"type": "BOOL"}}}
    with pytest.raises(ValidationError) as caught:
        parse_assignments(document, ["n=seven", "on=maybe", "m=1", "novalue"])
    assert caught.value.codes == ["invalid_value", "invalid_value", "unknown_param", "invalid_value"]
    assert caught.value.errors[0].input == "n" and caught.value.errors[0].found == "'seven'"


def test_param_values_reach_the_nodes_and_are_range_checked(workspace: Path) -> None:
    engine = engine_for(workspace)
    graph = workspace / "graphs" / "canny_blend.json"
    assert engine.run(graph, {"low": 10, "high": 40}).outputs["image"].shape == (1, 96, 128, 3)
    with pytest.raises(ValidationError) as caught:
        engine.run(graph, {"low": 300})
    assert caught.value.codes == ["value_out_of_range"]


def test_template_object_runs_like_the_command_line(workspace: Path) -> None:
    engine = engine_for(workspace)
    template = Template(workspace / "graphs" / "canny_blend.json", engine.registry)
    assert list(template.params) == ["photo", "region", "low", "high", "feather", "prefix"]
    assert template.params["low"].type == "INT" and template.params["low"].default == 60
    by_object = template.run(engine, low=20)
    by_path = engine.run(workspace / "graphs" / "canny_blend.json", {"low": 20})
    assert by_path.ran == [] and torch.equal(by_object.outputs["image"], by_path.outputs["image"])


def test_template_node_gives_the_same_pixels_as_its_nodes_inline(workspace: Path) -> None:
    engine = engine_for(workspace)
    templated = engine.run(workspace / "graphs" / "overlay_pair.json").outputs["coarse"]
    inline = engine.run(workspace / "graphs" / "canny_blend.json",
                        {"low": 100, "high": 220, "prefix": "inline"}).outputs["image"]
    assert torch.equal(templated, inline)


def test_template_nodes_expand_under_their_id_and_share_cached_work(workspace: Path) -> None:
    engine = engine_for(workspace)
    first = engine.run(workspace / "graphs" / "overlay_pair.json")
    # Templates expand in place, so ties in the topological order follow the flattened document.
    assert first.ran == ["photo", "region", "fine/edges", "fine/blend", "coarse/edges", "coarse/blend",
                         "save_fine", "save_coarse"]
    # The same template with the same inputs elsewhere reuses every result: ids are not in the keys. Only the
    # SaveImage nodes write again: their PNGs embed the document, which has changed.
    pair = json.loads((workspace / "graphs" / "overlay_pair.json").read_text())
    pair["nodes"]["again"] = dict(pair["nodes"]["fine"])
    pair["outputs"]["again"] = "again.edges"
    second = engine.run(write(workspace / "graphs" / "triple.json", pair))
    assert second.ran == ["save_fine", "save_coarse"] and second.outputs["again"].shape == (1, 96, 128, 3)


def test_nested_templates_run(workspace: Path) -> None:
    outer = write(workspace / "graphs" / "templates" / "double_overlay.json", {
        "graphflow": 1,
        "params": {"image": {"type": "IMAGE"}, "mask": {"type": "MASK"}},
        "nodes": {
            "once": {"template": "edge_overlay.json",
                     "inputs": {"image": {"param": "image"}, "mask": {"param": "mask"}}},
            "twice": {"template": "edge_overlay.json",
                      "inputs": {"image": {"from": "once.image"}, "mask": {"param": "mask"}, "low": 5}},
        },
        "outputs": {"image": "twice.image"},
    })
    graph = write(workspace / "graphs" / "nested.json", {
        "graphflow": 1,
        "nodes": {
            "photo": {"type": "LoadImage", "inputs": {"path": "graphs/assets/room.png"}},
            "region": {"type": "LoadMask", "inputs": {"path": "graphs/assets/room_mask.png"}},
            "both": {"template": outer.name.join(["templates/", ""]),
                     "inputs": {"image": {"from": "photo.image"}, "mask": {"from": "region.mask"}}},
        },
        "outputs": {"image": "both.image"},
    })
    result = engine_for(workspace).run(graph)
    assert result.ran == ["photo", "region", "both/once/edges", "both/once/blend", "both/twice/edges",
                          "both/twice/blend"]


def test_recursive_templates_are_reported(workspace: Path) -> None:
    templates = workspace / "graphs" / "templates"
    for name, other in (("ping.json", "pong.json"), ("pong.json", "ping.json")):
        write(templates / name, {"graphflow": 1, "params": {"x": {"type": "FLOAT", "default": 1.0}},
                                 "nodes": {"inner": {"template": other, "inputs": {"x": {"param": "x"}}}},
                                 "outputs": {"y": "inner.y"}})
    graph = write(workspace / "graphs" / "loop.json", {
        "graphflow": 1, "nodes": {"start": {"template": "templates/ping.json", "inputs": {}}},
        "outputs": {"y": "start.y"}})
    with pytest.raises(ValidationError) as caught:
        engine_for(workspace).run(graph)
    assert "recursive_template" in caught.value.codes
    assert "ping.json -> pong.json -> ping.json" in str(caught.value)


def test_template_reference_problems(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copy(GRAPHS / "templates" / "edge_overlay.json", elsewhere / "outside.json")
    graph = write(workspace / "graphs" / "refs.json", {
        "graphflow": 1,
        "nodes": {
            "photo": {"type": "LoadImage", "inputs": {"path": "graphs/assets/room.png"}},
            "missing": {"template": "templates/nope.json", "inputs": {}},
            "outside": {"template": str(elsewhere / "outside.json"), "inputs": {}},
            "wrong": {"template": "templates/edge_overlay.json",
                      "inputs": {"image": {"from": "photo.image"}, "mask": {"from": "photo.image"}, "lo": 1}},
        },
        "outputs": {"image": "photo.image"}})
    with pytest.raises(ValidationError) as caught:
        engine_for(workspace).run(graph)
    found = {(error.code, error.node, error.input) for error in caught.value.errors}
    assert found == {("template_not_found", "missing", "template"), ("path_outside_root", "outside", "template"),
                     ("type_mismatch", "wrong", "mask"), ("unknown_input", "wrong", "lo")}


def test_template_used_from_the_builder_saves_a_relative_reference(workspace: Path) -> None:
    overlay = Template(workspace / "graphs" / "templates" / "edge_overlay.json")
    g = Graph("built")
    photo = g.add(LoadImage(path="graphs/assets/room.png"), "photo")
    region = g.add(LoadMask(path="graphs/assets/room_mask.png"), "region")
    fine = g.add(overlay(image=photo.image, mask=region.mask, low=20, high=60), "fine")
    g.add(SaveImage(image=fine.image, prefix="built"), "save")
    g.output("fine", fine.image)
    with pytest.raises(ValidationError) as caught:
        overlay(image=region.mask)
    assert caught.value.codes == ["type_mismatch"]
    g.save(workspace / "graphs" / "built.json")
    saved = json.loads((workspace / "graphs" / "built.json").read_text())
    assert saved["nodes"]["fine"] == {"template": "templates/edge_overlay.json", "inputs": {
        "image": {"from": "photo.image"}, "mask": {"from": "region.mask"}, "low": 20, "high": 60}}
    engine = engine_for(workspace)
    built = engine.run(workspace / "graphs" / "built.json").outputs["fine"]
    assert torch.equal(built, engine.run(workspace / "graphs" / "overlay_pair.json").outputs["fine"])


def test_editing_a_template_file_is_seen_by_the_next_run(workspace: Path) -> None:
    engine = engine_for(workspace)
    pair = workspace / "graphs" / "overlay_pair.json"
    engine.run(pair)
    template_path = workspace / "graphs" / "templates" / "edge_overlay.json"
    template = json.loads(template_path.read_text())
    template["params"]["feather"]["default"] = 0
    write(template_path, template)
    again = engine.run(pair)
    assert again.ran == ["fine/blend", "coarse/blend", "save_fine", "save_coarse"]


def test_a_scalar_output_can_feed_a_template_param(workspace: Path) -> None:
    graph = write(workspace / "graphs" / "linked_threshold.json", {
        "graphflow": 1,
        "nodes": {
            "photo": {"type": "LoadImage", "inputs": {"path": "graphs/assets/room.png"}},
            "region": {"type": "LoadMask", "inputs": {"path": "graphs/assets/room_mask.png"}},
            "low": {"type": "Int", "inputs": {"value": 100}},
            "overlay": {"template": "templates/edge_overlay.json", "inputs": {
                "image": {"from": "photo.image"}, "mask": {"from": "region.mask"}, "low": {"from": "low.value"},
                "high": 220}},
        },
        "outputs": {"image": "overlay.image"}})
    engine = engine_for(workspace)
    linked = engine.run(graph).outputs["image"]
    assert torch.equal(linked, engine.run(workspace / "graphs" / "overlay_pair.json").outputs["coarse"])


def test_problems_inside_a_template_name_the_using_node_and_the_file(workspace: Path) -> None:
    write(workspace / "graphs" / "templates" / "bad_math.json", {
        "graphflow": 1, "params": {"x": {"type": "FLOAT", "default": 1.0}},
        "nodes": {"m": {"type": "Math", "inputs": {"a": {"param": "x"}, "op": "pow"}}}, "outputs": {"y": "m.result"}})
    graph = write(workspace / "graphs" / "uses_bad.json", {
        "graphflow": 1, "nodes": {"t": {"template": "templates/bad_math.json", "inputs": {}},
                                  "u": {"template": "templates/bad_math.json", "inputs": {"x": 2.0}}},
        "outputs": {"a": "t.y", "b": "u.y"}})
    with pytest.raises(ValidationError) as caught:
        engine_for(workspace).run(graph)
    assert [(error.code, error.node, error.input) for error in caught.value.errors] == [
        ("value_not_in_choices", "t/m", "op"), ("value_not_in_choices", "u/m", "op")]
    assert all("in template bad_math.json" in error.message for error in caught.value.errors)


def test_a_template_output_named_like_a_node_attribute_is_refused(workspace: Path) -> None:
    write(workspace / "graphs" / "templates" / "clash.json", {
        "graphflow": 1, "nodes": INT_NODE_FOR_TEMPLATES, "outputs": {"run": "n.value"}})
    graph = write(workspace / "graphs" / "uses_clash.json", {
        "graphflow": 1, "nodes": {"c": {"template": "templates/clash.json", "inputs": {}}}, "outputs": {}})
    with pytest.raises(ValidationError) as caught:
        engine_for(workspace).run(graph)
    assert caught.value.codes == ["invalid_document"] and caught.value.errors[0].node == "c"


def test_dict_documents_resolve_templates_against_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine()
    for name, value in (("first", 1), ("second", 2)):
        write(tmp_path / name / "t.json", {"graphflow": 1, "nodes": {"n": {"type": "Int", "inputs": {"value": value}}},
                                           "outputs": {"o": "n.value"}})
    graph = {"graphflow": 1, "nodes": {"t": {"template": "t.json", "inputs": {}}}, "outputs": {"o": "t.o"}}
    monkeypatch.chdir(tmp_path / "first")
    assert engine.run(graph).outputs == {"o": 1}
    monkeypatch.chdir(tmp_path / "second")
    assert engine.run(graph).outputs == {"o": 2}

