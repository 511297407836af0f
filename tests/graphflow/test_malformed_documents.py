"""Malformed input of every kind ends in a listed GraphError, never in a Python traceback."""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphflow import Engine, Graph, GraphError, ValidationError, default_registry, dumps, load_document, parse_document
from graphflow.cli import main
from graphflow.errors import EXACT_HINTS, did_you_mean
from graphflow.schema import document_schema
from graphflow.templates import MAX_TEMPLATE_DEPTH, Template, parse_assignments
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


def _template_with_param(folder: Path, name: str) -> Path:
    path = folder / "with_param.json"
    path.write_text(json.dumps({"graphflow": 1, "params": {name: {"type": "INT", "default": 1}},
                                "nodes": {"n": {"type": "Int", "inputs": {"value": {"param": name}}}},
                                "outputs": {"x": "n.value"}}))
    return path


@pytest.mark.parametrize("name", ["my-param", "class", "1x", "a-"])
def test_param_names_that_are_no_python_identifiers_work_everywhere(tmp_path: Path, name: str) -> None:
    path = _template_with_param(tmp_path, name)
    document = json.loads(path.read_text())
    registry = default_registry()
    assert validate_document(document, registry) == []
    template = Template(path, registry)
    assert name not in inspect.signature(template.node_type).parameters  # keyword-only names must be identifiers
    assert template(**{name: 3}).values == {name: 3}
    user = {"graphflow": 1, "nodes": {"t": {"template": path.name, "inputs": {name: 5}}}, "outputs": {"x": "t.x"}}
    assert validate_document(user, registry, base_dir=tmp_path) == []
    assert parse_assignments(document, [f"{name}=7"]) == {name: 7}
    assert Graph().param(name, "INT", 1).name == name
    jsonschema.validate(document, document_schema(registry))


@pytest.mark.parametrize("name", ["", "a b", "a=b", "a.b", "\ud800", "a\n", "-x", "x" * 300 + "!"])
def test_param_names_outside_the_node_id_rule_are_invalid_param_everywhere(tmp_path: Path, name: str) -> None:
    path = _template_with_param(tmp_path, name)
    document = json.loads(path.read_text())
    registry = default_registry()
    assert [error.code for error in validate_document(document, registry)] == ["invalid_param", "unknown_param"]
    with pytest.raises(ValidationError) as caught:
        Template(path, registry)
    assert caught.value.codes == ["invalid_param"]
    user = {"graphflow": 1, "nodes": {"t": {"template": path.name, "inputs": {}}}, "outputs": {"x": "t.x"}}
    assert [(error.code, error.node) for error in validate_document(user, registry, base_dir=tmp_path)] == [
        ("invalid_param", "t")]
    with pytest.raises(ValidationError) as caught:
        parse_assignments(document, [f"{name}=7"] if "=" not in name else ["a=b=7"])
    assert caught.value.codes == (["invalid_param"] if "=" not in name else ["unknown_param"])
    with pytest.raises(ValidationError) as caught:
        Graph().param(name, "INT", 1)
    assert caught.value.codes == ["invalid_param"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, document_schema(registry))


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


DEEP = {"graphflow": 1, "nodes": {"n": {"type": "Int", "inputs": {"value": _deep(5000)}}}, "outputs": {"x": "n.value"}}


@pytest.mark.parametrize("entry", [
    lambda: Engine().run(DEEP),
    lambda: Engine().run(DEEP | {"params": {"p": {"type": "INT", "default": _deep(5000)}}}),
    lambda: Graph.from_document(DEEP),
    lambda: parse_assignments(DEEP | {"params": {"p": {"type": "INT", "default": _deep(5000)}}}, ["p=1"]),
    lambda: parse_document(json.dumps(document(nodes={"n": {"type": "Int", "inputs": {"value": _deep(500)}}}))),
    lambda: dumps(DEEP),
    lambda: Graph().param("p", "INT", default=_deep(5000)),
], ids=["Engine.run", "Engine.run param default", "Graph.from_document", "parse_assignments", "parse_document",
        "dumps", "Graph.param"])
def test_absurd_nesting_is_a_located_error_in_every_entry_point(entry: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        entry()
    assert set(caught.value.codes) == {"invalid_document"}
    assert "more than 64 levels deep" in str(caught.value) and len(str(caught.value)) < 2000
    assert [(error.code, error.node) for error in validate_document(DEEP, default_registry())] == [
        ("invalid_document", "n")]


def test_documents_that_contain_themselves_or_share_their_way_to_any_size_are_refused_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("graphflow.document.MAX_VALUES", 100_000)  # the bound's size does not matter here, its use does
    loop: dict[str, Any] = {}
    loop["again"] = loop
    shared: Any = [1]
    for _ in range(60):
        shared = [shared, shared]  # 2**60 values written out, a few hundred objects in memory
    started = time.perf_counter()
    for value, problems in ((loop, ["more than 64 levels deep"]),
                            (shared, ["more than 64 levels deep", "more than 100,000 values"])):
        errors = validate_document(document(nodes={"n": {"type": "Int", "inputs": {"value": value}}}),
                                   default_registry())
        assert {error.code for error in errors} == {"invalid_document"} and (errors[0].node, errors[0].input) == (
            "n", "value")
        assert all(problem in error.message for problem, error in zip(problems, errors, strict=True))
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize(("parts", "node", "input"), [
    ({"nodes": {"n": {"type": "Int", "inputs": {"value": {1, 2}}}}}, "n", "value"),
    ({"nodes": {"n": {"type": "Int", "inputs": {"value": b"1"}}}}, "n", "value"),
    ({"nodes": {"n": {"type": "Int", "inputs": {"value": object()}}}}, "n", "value"),
    ({"nodes": {"n": {"type": "JoinText", "inputs": {"texts": ("a", "b")}}}}, "n", "texts"),
    ({"nodes": {"n": {"type": "Int", "inputs": {"value": {float("nan"): 1}}}}}, "n", "value"),
    ({"nodes": {"n": {"type": "Int", "inputs": {3: 1}}}}, "n", None),
    ({"nodes": {("n",): {"type": "Int"}}}, None, "nodes"),
    ({"params": {7: {"type": "INT"}}}, None, "params"),
    ({"outputs": {None: "n.value"}}, None, "outputs"),
])
def test_python_values_json_cannot_write_are_located_errors(parts: dict[str, Any], node: str | None,
                                                             input: str | None) -> None:
    for action in (lambda: validate_document(document(**parts), default_registry()),
                   lambda: Engine().run(document(**parts)).outputs, lambda: Graph.from_document(document(**parts))):
        try:
            errors = action()
        except ValidationError as error:
            errors = error.errors
        assert [(error.code, error.node, error.input) for error in errors] == [("invalid_document", node, input)]


@pytest.fixture
def odd_paths(tmp_path: Path) -> Path:
    """A graph folder whose template references lead nowhere good: loops, folders, FIFOs, links out of it."""
    root = tmp_path / "graphs"
    (root / "folder.json").mkdir(parents=True)
    (root / "loop_a.json").symlink_to("loop_b.json")
    (root / "loop_b.json").symlink_to("loop_a.json")
    os.mkfifo(root / "fifo.json")
    (tmp_path / "outside.json").write_text(json.dumps(document()))
    (root / "escape.json").symlink_to(tmp_path / "outside.json")
    (root / "dangling.json").symlink_to(tmp_path / "nowhere.json")
    (root / "fine.json").write_text(json.dumps(document()))
    return root


@pytest.mark.parametrize(("reference", "code", "fragment"), [
    ("loop_a.json", "template_not_found", "Symlink loop"),
    ("folder.json", "template_not_found", "is a directory"),
    ("fifo.json", "template_not_found", "is a FIFO"),
    ("escape.json", "path_outside_root", "inside the input directories"),
    ("dangling.json", "path_outside_root", "inside the input directories"),
    ("../outside.json", "path_outside_root", "inside the input directories"),
    ("missing.json", "template_not_found", "No such file"),
])
def test_template_paths_that_name_no_file_inside_the_roots_are_refused(odd_paths: Path, reference: str, code: str,
                                                                      fragment: str) -> None:
    graph = {"graphflow": 1, "nodes": {"t": {"template": reference}}, "outputs": {"x": "t.x"}}
    [error] = validate_document(graph, default_registry(), base_dir=odd_paths)
    assert (error.code, error.node, error.input) == (code, "t", "template") and fragment in str(error)
    if code == "template_not_found" and reference != "missing.json":
        with pytest.raises(ValidationError) as caught:
            Template(odd_paths / reference)
        assert caught.value.codes == [code]


def test_an_unreadable_template_is_reported_on_the_node_that_uses_it(odd_paths: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: str, flags: int) -> int:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr("graphflow.document._open_nonblocking", refuse)  # root reads files whatever their mode
    graph = {"graphflow": 1, "nodes": {"t": {"template": "fine.json"}}, "outputs": {"x": "t.x"}}
    [error] = validate_document(graph, default_registry(), base_dir=odd_paths)
    assert (error.code, error.node, error.input) == ("file_not_found", "t", "template")
    assert "Permission denied" in error.message


def test_templates_nested_past_the_limit_are_refused_not_a_recursion_error(tmp_path: Path) -> None:
    for level in range(MAX_TEMPLATE_DEPTH + 2):  # t0 uses t1, which uses t2, ...
        inner = {"template": f"t{level + 1}.json", "inputs": {}} if level <= MAX_TEMPLATE_DEPTH else {"type": "Int"}
        (tmp_path / f"t{level}.json").write_text(json.dumps(
            {"graphflow": 1, "nodes": {"n": inner}, "outputs": {"value": "n.value"}}))
    assert validate_document(json.loads((tmp_path / "t1.json").read_text()), default_registry(), base_dir=tmp_path) \
        == []
    [error] = validate_document(json.loads((tmp_path / "t0.json").read_text()), default_registry(), base_dir=tmp_path)
    assert (error.code, error.node) == ("recursive_template", "n") and "more than 32 deep" in error.message


def test_reading_a_fifo_as_a_document_does_not_wait_for_a_writer(odd_paths: Path) -> None:
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            load_document(odd_paths / "fifo.json")
        except ValidationError as error:
            outcome.append(error)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(10)
    assert [error.codes for error in outcome if isinstance(error, ValidationError)] == [["file_not_found"]]


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.text("ab_1-", max_size=6), st.lists(st.text("ab_1-", min_size=1, max_size=6), max_size=EXACT_HINTS))
def test_hints_among_few_names_are_what_difflib_gives(name: str, known: list[str]) -> None:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
    assert did_you_mean(name, known) == (f"; did you mean '{close[0]}'?" if close else "")
    assert did_you_mean(name, dict.fromkeys(known)) == did_you_mean(name, known)


def test_hints_stay_fast_with_ten_thousand_bad_links() -> None:
    size = 10_000
    graph = {"graphflow": 1, "nodes": {f"n{index}": {"type": "Math", "inputs": {"a": {"from": f"n{index}x.result"}}}
                                       for index in range(size)}, "outputs": {"r": "n0.result"}}
    started = time.perf_counter()
    errors = validate_document(graph, default_registry())
    seconds = time.perf_counter() - started
    assert len(errors) == size and all(error.message.endswith(f"did you mean '{error.node}'?") for error in errors)
    assert seconds < 5  # about 0.6 s on two cores; comparing with every node id took over a minute


def test_typos_in_a_large_collection_find_the_name_meant() -> None:
    rng = random.Random(8)
    words = ["photo", "edges", "depth", "sampler", "decode", "controlnet", "mask", "latent", "positive", "lora"]
    names = list(dict.fromkeys(f"{rng.choice(words)}_{rng.choice(words)}_{index}" for index in range(5000)))
    typos = {}
    for meant in rng.sample(names, 200):
        at = rng.randrange(len(meant))  # one character left out, added or changed
        typo = rng.choice([meant[:at] + meant[at + 1:], meant[:at] + "q" + meant[at:],
                           meant[:at] + "q" + meant[at + 1:]])
        if typo not in names:
            typos[typo] = meant
    found = sum(did_you_mean(typo, names) == f"; did you mean '{meant}'?" for typo, meant in typos.items())
    assert found >= 0.95 * len(typos)


def test_a_format_tag_nested_without_end_is_a_located_error_on_every_path() -> None:
    """The format tag is read before anything else: its error message must not recurse into it either."""
    deep: list[Any] = []
    inner = deep
    for _ in range(5000):
        inner.append([])
        inner = inner[0]
    engine = Engine(default_registry())
    previous = engine.compile({"graphflow": 1, "nodes": INT_NODE, "outputs": {"x": "n.value"}})
    for attempt in (lambda: validate_document({"graphflow": deep, "nodes": {}}, default_registry()),
                    lambda: engine.compile({"graphflow": deep, "nodes": INT_NODE, "outputs": {"x": "n.value"}})):
        try:
            errors = attempt()
        except ValidationError as error:
            errors = error.errors
        assert [error.code for error in errors][:1] in (["unsupported_version"], ["invalid_document"])
    assert previous is engine.compile({"graphflow": 1, "nodes": INT_NODE, "outputs": {"x": "n.value"}})
