"""Re-runs of an edited document: only what changed is validated and keyed again, and nothing stale is kept.

An Engine keeps the last compile of each document and reuses every node whose entry is unchanged; these tests
attack that reuse (values equal in Python but not in JSON, types swapped under one id, edits to the caller's
dict after the run, params) and pin that only the keys downstream of a change are computed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

import graphflow.planning
from graphflow import Engine, ValidationError, default_registry
from graphflow.registry import NodeRegistry


def doc(nodes: dict[str, Any], outputs: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"graphflow": 1, "name": "g", "nodes": nodes, "outputs": outputs, **extra}


def star(spokes: int) -> dict[str, Any]:
    nodes: dict[str, Any] = {"hub": {"type": "Int", "inputs": {"value": 2}}}
    for index in range(spokes):
        nodes[f"s{index}"] = {"type": "Math", "inputs": {"a": {"from": "hub.value"}, "b": float(index), "op": "mul"}}
    return doc(nodes, {f"r{index}": f"s{index}.result" for index in range(spokes)})


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return Engine(default_registry(), input_dirs=[tmp_path], output_dir=tmp_path / "out")


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """For each call of cache_key during planning, the key parts: which nodes had their keys computed."""
    calls: list[list[str]] = []
    real = graphflow.planning.cache_key

    def counting(parts: list[str]) -> str:
        calls.append(parts)
        return real(parts)

    monkeypatch.setattr(graphflow.planning, "cache_key", counting)
    return calls


def test_one_changed_leaf_keys_only_its_cone(engine: Engine, keyed: list[list[str]]) -> None:
    document = star(50)
    engine.run(document)
    assert len(keyed) == 51
    keyed.clear()
    changed = copy.deepcopy(document)
    changed["nodes"]["s7"]["inputs"]["b"] = 700.0
    result = engine.run(changed)
    assert len(keyed) == 1 and "b=700.0" in keyed[0]
    assert result.ran == ["s7"] and result.outputs["r7"] == 1400.0 and result.outputs["r8"] == 16.0


def test_a_changed_hub_rekeys_every_consumer(engine: Engine, keyed: list[list[str]]) -> None:
    document = star(5)
    engine.run(document)
    keyed.clear()
    changed = copy.deepcopy(document)
    changed["nodes"]["hub"]["inputs"]["value"] = 3
    result = engine.run(changed)
    assert len(keyed) == 6 and sorted(result.ran) == ["hub", "s0", "s1", "s2", "s3", "s4"]
    assert result.outputs["r4"] == 12.0


def test_an_identical_document_is_not_revalidated_nor_rekeyed(engine: Engine, keyed: list[list[str]]) -> None:
    document = star(5)
    first = engine.compile(document)
    engine.run(document)
    keyed.clear()
    assert engine.compile(copy.deepcopy(document)) is first
    assert engine.run(copy.deepcopy(document)).ran == [] and keyed == []


@pytest.mark.parametrize(("before", "after", "input_type"), [
    (1, True, "Int"),        # True == 1 in Python; a bool is not an INT
    (0, False, "Int"),
    (1.0, 1, "Float"),       # 1 == 1.0, but keys tell them apart
    (0.0, -0.0, "Float"),    # 0.0 == -0.0
    ("1", 1, "String"),
])
def test_values_equal_in_python_but_not_in_json_are_not_mistaken_for_unchanged(
        engine: Engine, before: Any, after: Any, input_type: str) -> None:
    document = doc({"n": {"type": input_type, "inputs": {"value": before}}}, {"v": "n.value"})
    engine.run(document)
    changed = copy.deepcopy(document)
    changed["nodes"]["n"]["inputs"]["value"] = after
    try:
        result = engine.run(changed)
    except ValidationError as error:  # a bool for an INT, a number for a STRING
        assert error.codes == ["invalid_value"]
        return
    assert result.ran == ["n"]
    assert repr(result.outputs["v"]) == repr(float(after))


def test_editing_the_callers_dict_after_a_run_changes_nothing_already_compiled(engine: Engine) -> None:
    document = star(3)
    compiled = engine.compile(document)
    engine.run(document)
    document["nodes"]["s1"]["inputs"]["b"] = 100.0  # edited in place, as scripts do between runs
    assert compiled.document is not None and compiled.document["nodes"]["s1"]["inputs"]["b"] == 1.0
    result = engine.run(document)
    assert result.ran == ["s1"] and result.outputs["r1"] == 200.0


def test_a_node_replaced_by_another_type_under_the_same_id_rechecks_its_consumers(engine: Engine) -> None:
    document = doc({"src": {"type": "Int", "inputs": {"value": 1}},
                    "use": {"type": "Math", "inputs": {"a": {"from": "src.value"}}}}, {"r": "use.result"})
    engine.run(document)
    changed = copy.deepcopy(document)
    changed["nodes"]["src"] = {"type": "String", "inputs": {"value": "x"}}
    with pytest.raises(ValidationError) as caught:
        engine.run(changed)
    assert caught.value.codes == ["type_mismatch"] and caught.value.errors[0].node == "use"


def test_a_removed_source_is_reported_at_its_consumers(engine: Engine) -> None:
    document = doc({"src": {"type": "Int", "inputs": {"value": 1}},
                    "use": {"type": "Math", "inputs": {"a": {"from": "src.value"}}}}, {"r": "use.result"})
    engine.run(document)
    changed = copy.deepcopy(document)
    del changed["nodes"]["src"]
    with pytest.raises(ValidationError) as caught:
        engine.run(changed)
    assert caught.value.codes == ["bad_link"]


def test_new_param_values_revalidate_the_nodes_that_use_them(engine: Engine) -> None:
    template = doc({"a": {"type": "Int", "inputs": {"value": 1}},
                    "t": {"type": "Math", "inputs": {"a": {"from": "a.value"}, "b": {"param": "b"}}}},
                   {"r": "t.result"}, params={"b": {"type": "FLOAT", "default": 1.0, "min": 0.0, "max": 10.0}})
    assert engine.run(template, {"b": 2.0}).outputs["r"] == 3.0
    assert engine.run(template, {"b": 5.0}).outputs["r"] == 6.0
    with pytest.raises(ValidationError) as caught:
        engine.run(template, {"b": 50.0})
    assert caught.value.codes == ["value_out_of_range"]
    assert engine.run(template, {"b": 2.0}).ran == []


def test_registry_changes_are_not_masked_by_reuse(tmp_path: Path) -> None:
    registry = default_registry()
    engine = Engine(registry, input_dirs=[tmp_path], output_dir=tmp_path)
    document = doc({"n": {"type": "Int", "inputs": {"value": 1}}}, {"v": "n.value"})
    engine.run(document)
    other = Engine(NodeRegistry(), input_dirs=[tmp_path], output_dir=tmp_path)
    with pytest.raises(ValidationError) as caught:
        other.run(document)
    assert caught.value.codes == ["unknown_node_type"]


def test_an_edited_template_file_is_compiled_again(tmp_path: Path) -> None:
    inner = tmp_path / "inner.json"
    inner.write_text('{"graphflow": 1, "nodes": {"n": {"type": "Int", "inputs": {"value": 1}}}, '
                     '"outputs": {"v": "n.value"}}')
    engine = Engine(default_registry(), input_dirs=[tmp_path], output_dir=tmp_path / "out")
    outer = tmp_path / "outer.json"
    outer.write_text('{"graphflow": 1, "nodes": {"t": {"template": "inner.json"}}, "outputs": {"v": "t.v"}}')
    assert engine.run(outer).outputs["v"] == 1
    inner.write_text(inner.read_text().replace('"value": 1', '"value": 2'))
    assert engine.run(outer).outputs["v"] == 2
    as_dict = {"graphflow": 1, "nodes": {"t": {"template": str(inner)}}, "outputs": {"v": "t.v"}}
    assert engine.run(as_dict).outputs["v"] == 2
    inner.write_text(inner.read_text().replace('"value": 2', '"value": 3'))
    assert engine.run(as_dict).outputs["v"] == 3
