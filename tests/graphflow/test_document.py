"""Documents on disk: the format tag, migrations, JSON errors and byte-stable canonical saving."""

import json
import os
from pathlib import Path
from typing import Any

import pytest

import graphflow.document
from graphflow import ValidationError, dumps, load_document, parse_document, save_document

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"

# Canonical text as a person would write it: structural keys in fixed order, short objects on one line.
CANONICAL = """\
{
  "graphflow": 1,
  "name": "canny",
  "description": "Photo -> Canny edges",
  "params": {
    "low": {"type": "INT", "default": 100, "description": "lower threshold", "min": 0, "max": 255}
  },
  "nodes": {
    "img": {"type": "LoadImage", "inputs": {"path": "room.png"}},
    "edges": {"type": "Canny", "inputs": {"image": {"from": "img.image"}, "low": {"param": "low"}}},
    "save": {"type": "SaveImage", "inputs": {"image": {"from": "edges.image"}, "prefix": "édges"}}
  },
  "outputs": {"edges": "edges.image"}
}
"""

# A node too long for one line is expanded one key per line; its inputs still fit on one.
CANONICAL_WITH_LONG_NODE = """\
{
  "$schema": "https://graphflow.dev/schema/graph-1.json",
  "graphflow": 1,
  "nodes": {
    "a": {"type": "Float", "version": "1.0.0", "inputs": {"value": 0.5}},
    "b": {"type": "Int", "inputs": {"value": 2}},
    "product_of_a_and_b": {
      "type": "Math",
      "version": "1.0.0",
      "inputs": {"a": {"from": "a.value"}, "b": {"from": "b.value"}, "op": "mul"}
    }
  },
  "outputs": {"result": "product_of_a_and_b.result"}
}
"""


def test_current_format_tag_is_accepted() -> None:
    document = parse_document('{"graphflow": 1, "nodes": {}}')

    assert document == {"graphflow": 1, "nodes": {}}


@pytest.mark.parametrize("text", [
    '{"nodes": {}}',
    '{"graphflow": "1", "nodes": {}}',
    '{"graphflow": true, "nodes": {}}',
    '{"graphflow": 1.0, "nodes": {}}',
])
def test_missing_or_non_integer_format_tag_is_unsupported_version(text: str) -> None:
    with pytest.raises(ValidationError) as raised:
        parse_document(text)

    assert raised.value.codes == ["unsupported_version"]
    error = raised.value.errors[0]
    assert error.input == "graphflow"
    assert '"graphflow": 1' in error.message


def test_newer_format_version_is_unsupported_and_says_to_upgrade() -> None:
    with pytest.raises(ValidationError) as raised:
        parse_document('{"graphflow": 2, "nodes": {}}')

    error = raised.value.errors[0]
    assert raised.value.codes == ["unsupported_version"]
    assert (error.expected, error.found) == ("format 1", "2")
    assert "upgrade" in error.message


def test_older_format_without_a_migration_is_unsupported_version() -> None:
    with pytest.raises(ValidationError) as raised:
        parse_document('{"graphflow": 0, "nodes": {}}')

    assert raised.value.codes == ["unsupported_version"]
    assert "no migration" in raised.value.errors[0].message


def test_registered_migration_is_applied_on_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def rename_graph_to_nodes(document: dict[str, Any]) -> dict[str, Any]:
        migrated = dict(document)
        migrated["nodes"] = migrated.pop("graph")
        return migrated

    monkeypatch.setattr(graphflow.document, "FORMAT_VERSION", 2)
    monkeypatch.setitem(graphflow.document.MIGRATIONS, 1, rename_graph_to_nodes)
    path = tmp_path / "old.json"
    path.write_text('{"graphflow": 1, "graph": {"n": {"type": "Int"}}}', encoding="utf-8")

    document = load_document(path)

    assert document == {"graphflow": 2, "nodes": {"n": {"type": "Int"}}}


def test_migrations_are_chained_from_old_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graphflow.document, "FORMAT_VERSION", 3)
    monkeypatch.setitem(graphflow.document.MIGRATIONS, 1, lambda document: {**document, "steps": ["1->2"]})
    monkeypatch.setitem(graphflow.document.MIGRATIONS, 2,
                        lambda document: {**document, "steps": [*document["steps"], "2->3"]})

    document = parse_document('{"graphflow": 1, "nodes": {}}')

    assert document == {"graphflow": 3, "nodes": {}, "steps": ["1->2", "2->3"]}


def test_invalid_json_reports_line_and_column() -> None:
    text = '{\n  "graphflow": 1,\n  "nodes": {,}\n}'

    with pytest.raises(ValidationError) as raised:
        parse_document(text, "broken.json")

    assert raised.value.codes == ["invalid_json"]
    message = raised.value.errors[0].message
    assert "broken.json" in message
    assert "line 3" in message and "column 13" in message


def test_duplicate_node_id_in_the_text_is_reported_not_silently_dropped() -> None:
    text = '{"graphflow": 1, "nodes": {"a": {"type": "Int"}, "a": {"type": "Float"}}}'

    with pytest.raises(ValidationError) as raised:
        parse_document(text)

    assert raised.value.codes in (["invalid_node_id"], ["invalid_json"])
    assert "'a'" in str(raised.value)


def test_document_that_is_not_an_object_is_rejected() -> None:
    with pytest.raises(ValidationError) as raised:
        parse_document("[1, 2]")

    assert raised.value.codes == ["invalid_document"]
    assert raised.value.errors[0].found == "list"


def test_loading_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as raised:
        load_document(tmp_path / "nope.json")

    assert raised.value.codes == ["file_not_found"]
    assert "nope.json" in str(raised.value)


@pytest.mark.parametrize("text", [CANONICAL, CANONICAL_WITH_LONG_NODE], ids=["short-nodes", "long-node"])
def test_load_then_save_returns_the_same_bytes(tmp_path: Path, text: str) -> None:
    source, copy = tmp_path / "graph.json", tmp_path / "copy.json"
    source.write_bytes(text.encode("utf-8"))

    save_document(load_document(source), copy)

    assert copy.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("path", sorted(GRAPHS.rglob("*.json")), ids=lambda path: str(path.relative_to(GRAPHS)))
def test_example_graphs_are_canonical(tmp_path: Path, path: Path) -> None:
    copy = tmp_path / path.name

    save_document(load_document(path), copy)

    assert copy.read_bytes() == path.read_bytes()


def test_dumps_puts_structural_keys_in_fixed_order_and_keeps_user_order() -> None:
    scrambled = {
        "outputs": {"edges": "edges.image"},
        "nodes": {
            "img": {"inputs": {"path": "room.png"}, "type": "LoadImage"},
            "edges": {"inputs": {"image": {"from": "img.image"}, "low": {"param": "low"}}, "type": "Canny"},
            "save": {"inputs": {"image": {"from": "edges.image"}, "prefix": "édges"}, "type": "SaveImage"},
        },
        "params": {"low": {"max": 255, "min": 0, "description": "lower threshold", "default": 100, "type": "INT"}},
        "description": "Photo -> Canny edges",
        "name": "canny",
        "graphflow": 1,
    }

    assert dumps(scrambled) == CANONICAL


def test_dumps_keeps_node_and_input_order_and_sorts_unknown_keys_last() -> None:
    document = {"zeta": 1, "nodes": {
        "z": {"type": "Math", "inputs": {"op": "mul", "b": 2.0, "a": 1.0}},
        "a": {"type": "Int"},
    }, "graphflow": 1, "alpha": 2}

    text = dumps(document)

    assert list(json.loads(text)) == ["graphflow", "nodes", "alpha", "zeta"]
    assert list(json.loads(text)["nodes"]) == ["z", "a"]
    assert '"z": {"type": "Math", "inputs": {"op": "mul", "b": 2.0, "a": 1.0}}' in text


def test_dumps_writes_links_on_one_line_with_two_space_indent() -> None:
    document = {"graphflow": 1, "nodes": {"n": {"type": "Math", "inputs": {"a": {"from": "a.value"}}}}}

    assert dumps(document) == (
        '{\n'
        '  "graphflow": 1,\n'
        '  "nodes": {\n'
        '    "n": {"type": "Math", "inputs": {"a": {"from": "a.value"}}}\n'
        '  }\n'
        '}\n'
    )


def test_dumps_is_idempotent_on_its_own_output() -> None:
    text = dumps(json.loads(CANONICAL_WITH_LONG_NODE))

    assert dumps(json.loads(text)) == text == CANONICAL_WITH_LONG_NODE


def test_save_replaces_the_file_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "graph.json"
    path.write_text("old content", encoding="utf-8")

    save_document(json.loads(CANONICAL), path)

    assert path.read_text(encoding="utf-8") == CANONICAL
    assert os.listdir(tmp_path) == ["graph.json"]


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "graph.json"
    path.write_text("old content", encoding="utf-8")

    def fail(source: str, target: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_document(json.loads(CANONICAL), path)

    assert path.read_text(encoding="utf-8") == "old content"
    assert os.listdir(tmp_path) == ["graph.json"]


def test_save_creates_missing_folders(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "graph.json"

    save_document(json.loads(CANONICAL), path)

    assert path.read_text(encoding="utf-8") == CANONICAL
