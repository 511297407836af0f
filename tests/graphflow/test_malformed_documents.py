"""Malformed input of every kind ends in a listed GraphError, never in a Python traceback."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest

from graphflow import Engine, GraphError, ValidationError, default_registry, parse_document
from graphflow.cli import main
from graphflow.validation import validate_document

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
INT_NODE = {"n": {"type": "Int", "inputs": {"value": 1}}}


def document(**parts: Any) -> dict[str, Any]:
    return {"graphflow": 1, "nodes": INT_NODE, "outputs": {"x": "n.value"}} | parts


@pytest.mark.parametrize(("text", "code"), [
    ('{"graphflow": 1, "nodes": {"a": ' + "[" * 100_000, "invalid_json"),
    ('{"graphflow": ' + "9" * 5000 + "}", "invalid_json"),
    ('[1, 2]', "invalid_document"),
    ('{"graphflow": "1", "nodes": {}}', "unsupported_version"),
])
def test_unreadable_text_is_reported(text: str, code: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_document(text)
    assert caught.value.codes == [code]


@pytest.mark.parametrize(("declaration", "fragment"), [
    ({"type": []}, "unknown type"),
    ({"type": "INT", "min": "0", "default": 1}, "'min' that does not apply"),
    ({"type": "STRING", "min": 0, "default": "x"}, "'min' that does not apply"),
    ({"type": "INT", "choices": 3, "default": 1}, "choices that do not fit"),
    ({"type": "INT", "choices": "abc"}, "choices that do not fit"),
    ({"type": "FLOAT", "description": 5}, "description that is not text"),
    ({"type": "FLOAT", "default": float("nan")}, "default of param 'p' is not valid"),
])
def test_bad_param_declarations_are_invalid_param(declaration: dict[str, Any], fragment: str) -> None:
    errors = validate_document(document(params={"p": declaration}), default_registry())
    assert [error.code for error in errors] == ["invalid_param"] and fragment in errors[0].message


@pytest.mark.parametrize(("parts", "code", "where"), [
    ({"name": 5}, "invalid_document", "name"),
    ({"description": ["a"]}, "invalid_document", "description"),
    ({"nodes": {"n": {"type": "Int", "version": 1, "inputs": {"value": 1}}}}, "invalid_document", "version"),
    ({"nodes": {"n": {"type": "Int", "inputs": {"value": 10**5000}}}}, "value_out_of_range", "value"),
    ({"nodes": {"n": {"type": "Float", "inputs": {"value": float("nan")}}}}, "value_out_of_range", "value"),
    ({"nodes": {"n": {"type": "Float", "inputs": {"value": float("inf")}}}}, "value_out_of_range", "value"),
    ({"nodes": {"n": {"type": "Int", "inputs": {"value": {"from": 3}}}}}, "invalid_value", "value"),
    ({"nodes": {"n": {"type": "Int", "inputs": [1]}}}, "invalid_document", None),
    ({"nodes": {"n": None}}, "invalid_document", None),
])
def test_malformed_parts_are_located(parts: dict[str, Any], code: str, where: str | None) -> None:
    errors = validate_document(document(**parts), default_registry())
    assert [(error.code, error.input) for error in errors][:1] == [(code, where)]


def test_documents_built_in_python_are_version_checked_too() -> None:
    for version, code in ((None, "unsupported_version"), (99, "unsupported_version"), ("x", "unsupported_version")):
        errors = validate_document({"graphflow": version, "nodes": INT_NODE, "outputs": {"x": "n.value"}},
                                   default_registry())
        assert [error.code for error in errors] == [code]


def test_unusable_file_paths_are_path_errors(tmp_path: Path) -> None:
    engine = Engine(input_dirs=[tmp_path], output_dir=tmp_path / "out")
    graph = {"graphflow": 1, "nodes": {
        "nul": {"type": "LoadImage", "inputs": {"path": "a\u0000b.png"}},
        "long": {"type": "LoadImage", "inputs": {"path": "x" * 5000 + ".png"}},
    }, "outputs": {"a": "nul.image", "b": "long.image"}}
    with pytest.raises(ValidationError) as caught:
        engine.run(graph)
    assert caught.value.codes == ["file_not_found", "file_not_found"]


def test_non_utf8_and_nul_paths_fail_cleanly_in_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "latin1.json").write_bytes(b'{"graphflow": 1, "name": "caf\xe9", "nodes": {}}')
    assert main(["validate", str(tmp_path / "latin1.json"), "--json"]) == 1
    [error] = json.loads(capsys.readouterr().out)["errors"]
    assert error["code"] == "invalid_json" and "not UTF-8" in error["message"]


def test_a_plugin_that_fails_to_import_is_a_registry_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken_pack.py").write_text("raise RuntimeError('oops')\n")
    (tmp_path / "odd_pack.py").write_text("NODES = ['not a node']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["--plugin", "broken_pack", "nodes"]) == 1
    assert "cannot import plugin module 'broken_pack': RuntimeError: oops" in capsys.readouterr().err
    assert main(["--plugin", "odd_pack", "nodes"]) == 1
    assert "which is not a Node class" in capsys.readouterr().err


def test_a_template_node_that_failed_to_expand_does_not_break_ordering(tmp_path: Path) -> None:
    (tmp_path / "ok.json").write_text(json.dumps({
        "graphflow": 1, "params": {"x": {"type": "FLOAT", "default": 1.0}},
        "nodes": {"m": {"type": "Math", "inputs": {"a": {"param": "x"}}}}, "outputs": {"y": "m.result"}}))
    graph = {"graphflow": 1, "nodes": {"t": {"template": "ok.json", "inputs": {"x": "bad"}},
                                       "after": {"type": "Math", "inputs": {"a": {"from": "t.y"}}}},
             "outputs": {"a": "after.result"}}
    errors = validate_document(graph, default_registry(), base_dir=tmp_path)
    assert [(error.code, error.node, error.input) for error in errors] == [("invalid_value", "t", "x")]


def _locations(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found.extend(_locations(item, (*prefix, key)))
    return found


JUNK = [None, 0, -1, 1.5, float("nan"), True, "", "x", "a.b", "photo.image", "..", [], {}, [1],
        {"from": "photo.image"}, {"from": 3}, {"param": "photo"}, {"param": 3}, {"from": "x.y", "param": "z"},
        {"template": "x"}, 10**30, {"type": "Int"}, {"type": "IMAGE"}, "templates/edge_overlay.json"]


def test_random_damage_to_the_shipped_graphs_only_ever_gives_graph_errors() -> None:
    rng = random.Random(20261122)
    originals = [json.loads(path.read_text()) for path in sorted(GRAPHS.rglob("*.json"))]
    registry = default_registry()
    for _ in range(600):
        damaged = copy.deepcopy(rng.choice(originals))
        for _ in range(rng.randint(1, 3)):
            place = rng.choice(_locations(damaged)[1:] or [("nodes",)])
            parent = damaged
            for key in place[:-1]:
                parent = parent[key]
            if isinstance(parent, dict) and rng.random() < 0.3:
                del parent[place[-1]]
            else:
                parent[place[-1]] = copy.deepcopy(rng.choice(JUNK))
        for as_template in (False, True):
            errors = validate_document(damaged, registry, base_dir=GRAPHS, as_template=as_template)
            assert all(isinstance(error, GraphError) for error in errors)
