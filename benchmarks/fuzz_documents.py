"""Fuzz document validation: every document either validates or fails with listed GraphErrors, never a traceback.

Three kinds of documents, in turn: structured ones (node types from the real registry, inputs of every kind:
literals right and wrong, links good and bad, params, lists, huge and NaN numbers, odd Unicode, deep nesting),
the example graphs in graphs/ with their bytes damaged, and valid graphs of cheap nodes (Int, Float, String,
Bool, Math, JoinText), which are also run. Each goes through parse_document, validate_document,
compile_document(as_template=True), a dumps + parse_document round trip, and `graphflow validate` in text and
--json on an ASCII stdout. Prints the number of tracebacks (target 0), each distinct crash signature with the
smallest document that showed it, and the time per document.

    python benchmarks/fuzz_documents.py                 # 10,000 documents
    python benchmarks/fuzz_documents.py --count 500 --seed 7

tests/graphflow/test_fuzz_documents.py drives the same generators and checks through hypothesis.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import reprlib
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from typing import Any
from unittest import mock

from graphflow import Engine, GraphError, NodeExecutionError, ValidationError, cli, default_registry, dumps
from graphflow.document import load_document, parse_document, shape_errors
from graphflow.errors import Code
from graphflow.events import CancelToken
from graphflow.node import Input
from graphflow.registry import NodeRegistry
from graphflow.templates import parse_assignments
from graphflow.types import BUILTIN_TYPES
from graphflow.validation import compile_document, validate_document

GRAPHS = Path(__file__).resolve().parent.parent / "graphs"
ODD_TEXT = ("", " ", "\ud800", "\udcff", "a\x00b", "\u202eevil", "e\u0301", "\u0301", "\U0001f600", "\ufeff",
            "a\nb", "\x1b[31m", "..", "../../etc/passwd", "/etc/passwd", "a.b.c", "photo.image", "x" * 5000,
            "caf\u00e9", "my-param", "class", "1x", "a=b", "a b", "n0", "assets/room.png")
NUMBERS = (0, -1, 1, 7, 255, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**300, 0.5, -0.0, 1e308,
           float("nan"), float("inf"), float("-inf"), True, False)
TEMPLATES = ("templates/edge_overlay.json", "templates/archviz.json", "missing.json", "../README.md", "/etc/passwd",
             "templates", "demo.json", "a\x00b", "\ud800.json")
DAMAGE = (b'"\\ud800"', b"[" * 100, b"[" * 5000, b"{", b"}", b",", b'"x": ', b"1e999", b"NaN", b"-", b"\xff\xfe",
          b'{"from": "n.x"}', b"9" * 5000, b"\x00", b'"\\u0000"', b'{"param": "p"}', b"null", b"\xe2\x80\xae")
CHEAP_TYPES = ("Int", "Float", "String", "Bool", "Math", "JoinText")
CODES = {str(code) for code in Code}


def junk(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value, mostly wrong wherever it lands: numbers, odd text, links, params, lists, deep nests."""
    makers: tuple[Callable[[], Any], ...] = (
        lambda: None, lambda: rng.choice(NUMBERS), lambda: rng.choice(ODD_TEXT), lambda: {"from": rng.choice(ODD_TEXT)},
        lambda: {"param": rng.choice(ODD_TEXT)}, lambda: [junk(rng, depth + 1) for _ in range(rng.randint(0, 3))],
        lambda: {rng.choice(ODD_TEXT): junk(rng, depth + 1) for _ in range(rng.randint(0, 3))},
        lambda: nested(rng, junk(rng, depth + 1)))
    return rng.choice(makers if depth < 3 else makers[:5])()


def nested(rng: random.Random, value: Any) -> Any:
    """`value` inside lists or objects, from a few levels deep to thousands."""
    for _ in range(rng.choice((2, 63, 64, 65, 300, 3000, 5000))):
        value = [value] if rng.random() < 0.5 else {"a": value}
    return value


def literal(rng: random.Random, spec: Input) -> Any:
    """A literal that fits `spec` (scalars only; anything else gets junk)."""
    if spec.choices:
        return rng.choice(spec.choices)
    low = spec.min if spec.min is not None else -10
    high = spec.max if spec.max is not None else 10
    if spec.type == "INT":
        return rng.randint(int(low), int(high))
    if spec.type == "FLOAT":
        return rng.uniform(low, high)
    if spec.type == "BOOL":
        return rng.random() < 0.5
    if spec.type == "STRING":
        return rng.choice(("room", "assets/room.png", "tiny:sd15", *ODD_TEXT[:12]))
    return junk(rng)


def random_document(rng: random.Random, registry: NodeRegistry) -> dict[str, Any]:
    """A document of real node types whose every part may be right, wrong or absurd."""
    names = registry.names()
    ids = [f"n{index}" if rng.random() < 0.9 else rng.choice(ODD_TEXT) for index in range(rng.randint(0, 8))]
    chosen = {node_id: rng.choice(names) for node_id in ids}
    links = [f"{node_id}.{output}" for node_id, name in chosen.items() for output in registry.get(name).output_map]
    links += ["ghost.image", "n0.nope", "n0", "", ".x", "n0.image.x"]
    params = {rng.choice(("p", "seed", "my-param", *ODD_TEXT[:8])): _param(rng) for _ in range(rng.randint(0, 3))}
    nodes = {node_id: _node(rng, registry, name, links, list(params)) for node_id, name in chosen.items()}
    document: dict[str, Any] = {"graphflow": 1 if rng.random() < 0.95 else junk(rng), "nodes": nodes,
                                "outputs": {rng.choice(("image", "x", *ODD_TEXT[:6])): rng.choice([*links, 5])
                                            for _ in range(rng.randint(0, 2))}}
    if params:
        document["params"] = params
    for key in rng.sample(("name", "description", "$schema", "extra", "nodes", "outputs", "params"), rng.randint(0, 2)):
        document[key] = junk(rng)
    return document


def _node(rng: random.Random, registry: NodeRegistry, name: str, links: list[str], params: list[str]) -> Any:
    roll = rng.random()
    if roll < 0.08:
        return {"template": rng.choice(TEMPLATES), "inputs": {rng.choice(("image", "low", "x")): junk(rng)}}
    if roll < 0.12:
        return junk(rng)
    spec_of = registry.get(name)
    inputs = {spec.name: _input(rng, spec, links, params) for spec in spec_of.inputs if rng.random() < 0.7}
    if rng.random() < 0.1:
        inputs[rng.choice(ODD_TEXT)] = junk(rng)
    entry: dict[str, Any] = {"type": name if rng.random() < 0.95 else rng.choice(ODD_TEXT), "inputs": inputs}
    if rng.random() < 0.1:
        entry["version"] = rng.choice(("1.0.0", "2.0.0", "1", 1, None))
    return entry


def _input(rng: random.Random, spec: Input, links: list[str], params: list[str]) -> Any:
    roll = rng.random()
    if roll < 0.35:
        return literal(rng, spec)
    if roll < 0.6:
        return {"from": rng.choice(links)}
    if roll < 0.7:
        return {"param": rng.choice([*params, "ghost"])}
    if roll < 0.8:
        return [_input(rng, spec, links, params) for _ in range(rng.randint(0, 3))]
    return junk(rng)


def _param(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.1:
        return junk(rng)
    if roll < 0.6:  # a sound declaration, with a default of its type or none
        type_name = rng.choice(("INT", "FLOAT", "STRING", "BOOL", "IMAGE"))
        declared: dict[str, Any] = {"type": type_name}
        if type_name != "IMAGE" and rng.random() < 0.5:
            declared["default"] = literal(rng, Input("p", type_name))
        return declared
    declaration: dict[str, Any] = {"type": rng.choice((*sorted(BUILTIN_TYPES), "int", 3))}
    for key in ("default", "description", "min", "max", "choices"):
        if rng.random() < 0.3:
            declaration[key] = junk(rng) if rng.random() < 0.5 else rng.choice((1, 0.5, "x", [1, 2], True))
    return declaration


def assignments(rng: random.Random) -> list[str]:
    """Command-line `--set` strings, right and wrong."""
    texts = ("1", "x", "", "1e999", "9" * 5000, "true", "\ud800", "a=b", "nan")
    return [f"{rng.choice(('p', 'seed', 'my-param', *ODD_TEXT[:8]))}{rng.choice(('=', '==', ''))}{rng.choice(texts)}"
            for _ in range(rng.randint(0, 3))]


def param_values(rng: random.Random, document: dict[str, Any]) -> dict[Any, Any]:
    """Param values as a Python caller passes them: any value, under any name, even one that is not text."""
    declared = list(document["params"]) if isinstance(document.get("params"), dict) else []
    return {rng.choice((*declared * 4, "p", 1, None, *ODD_TEXT[:6])): junk(rng) if rng.random() < 0.7 else
            nested(rng, junk(rng)) for _ in range(rng.randint(1, 3))}


def cheap_document(rng: random.Random) -> dict[str, Any]:
    """A valid document of cheap nodes only, safe to run: small values, links to earlier nodes of fitting types."""
    nodes: dict[str, Any] = {}
    made: dict[str, list[str]] = {"number": [], "text": []}  # links to the outputs made so far, by kind
    results: list[str] = []

    def value(kind: str) -> Any:
        if made[kind] and rng.random() < 0.6:
            return {"from": rng.choice(made[kind])}
        return rng.uniform(-1e6, 1e6) if kind == "number" else rng.choice(("a", "", "caf\u00e9", "\ud800", "e\u0301",
                                                                            "\u202e", "x" * 1000))

    for index in range(rng.randint(1, 8)):
        kind = rng.choice(CHEAP_TYPES)
        inputs = {"Int": {"value": rng.randint(-(2**63), 2**63 - 1)}, "Float": {"value": value("number")},
                  "String": {"value": value("text")}, "Bool": {"value": rng.random() < 0.5},
                  "Math": {"a": value("number"), "b": value("number"), "op": rng.choice(("add", "sub", "div", "max"))},
                  "JoinText": {"texts": [value("text") for _ in range(rng.randint(0, 4))], "separator": value("text")},
                  }[kind]
        nodes[f"n{index}"] = {"type": kind, "inputs": inputs}
        link = f"n{index}.{ {'Math': 'result', 'JoinText': 'text'}.get(kind, 'value')}"
        results.append(link)
        if kind != "Bool":
            made["text" if kind in ("String", "JoinText") else "number"].append(link)
    return {"graphflow": 1, "nodes": nodes,
            "outputs": {f"o{k}": link for k, link in enumerate(rng.sample(results, rng.randint(1, len(results))))}}


def mutated_text(rng: random.Random, originals: list[bytes]) -> bytes:
    """One example graph's bytes with a few flips, cuts, copies and insertions of troublesome tokens."""
    data = bytearray(rng.choice(originals))
    for _ in range(rng.randint(1, 6)):
        position = rng.randrange(len(data) + 1)
        roll = rng.randrange(5)
        if roll == 0 and position < len(data):
            data[position] = rng.randrange(256)
        elif roll == 1:
            del data[position:position + rng.randint(1, 40)]
        elif roll == 2:
            data[position:position] = rng.choice(DAMAGE)
        elif roll == 3:
            data[position:position] = data[position:position + rng.randint(1, 200)]
        else:
            del data[position:]
    return bytes(data)


def errors_of(action: Callable[[], Any]) -> list[GraphError]:
    """The GraphErrors an action reports (returned or raised in a ValidationError), each checked to have a code."""
    try:
        result = action()
    except ValidationError as error:
        result = error.errors
    return with_codes(result if isinstance(result, list) else [])


def with_codes(errors: list[Any]) -> list[GraphError]:
    assert all(isinstance(error, GraphError) and isinstance(error.code, Code) for error in errors), errors
    return errors


def check_document(document: dict[str, Any], registry: NodeRegistry) -> None:
    """Validation ends in GraphErrors or success, the same twice over and after a dumps + parse round trip."""
    first = errors_of(lambda: validate_document(document, registry, base_dir=GRAPHS, as_template=True))
    assert errors_of(lambda: validate_document(document, registry, base_dir=GRAPHS, as_template=True)) == first
    errors_of(lambda: compile_document(document, registry, base_dir=GRAPHS, as_template=True))
    errors_of(lambda: validate_document(document, registry, base_dir=GRAPHS))
    if not shape_errors(document):
        again = errors_of(lambda: validate_document(parse_document(dumps(document)), registry, base_dir=GRAPHS,
                                                    as_template=True))
        assert _places(again) == _places(first), (first, again)


def _places(errors: list[GraphError]) -> list[tuple[str, str, str]]:
    """What and where, in any order: saving orders a node's unknown keys, so a message quoting them may differ."""
    return sorted((str(error.code), str(error.node), str(error.input)) for error in errors)


def check_generated(document: dict[str, Any], registry: NodeRegistry, folder: Path,
                    settings: list[str] | None = None) -> None:
    """check_document, `--set` values parsed and validated, and `graphflow validate` on the document written as JSON
    (when JSON can write it)."""
    check_document(document, registry)
    check_values(document, settings or [], registry)
    try:
        text = json.dumps(document)
    except (ValueError, RecursionError):  # nested past what json.dumps can write: check_document covered it
        return
    check_cli(_written(folder / "generated.json", text.encode("ascii")), registry)


def check_values(document: dict[str, Any], values: list[str] | dict[Any, Any], registry: NodeRegistry) -> None:
    """Param values, as `--set` strings (parsed first) or as a Python dict, validate or fail with GraphErrors."""
    parsed: list[dict[Any, Any]] = [values] if isinstance(values, dict) else []
    if isinstance(values, list):
        errors_of(lambda: parsed.append(parse_assignments(document, values)))
    for given in parsed:
        errors_of(partial(validate_document, document, registry, given, base_dir=GRAPHS))


def check_text(data: bytes, registry: NodeRegistry, folder: Path) -> None:
    """A document file's bytes: `graphflow validate` renders it, and what parses passes check_document."""
    path = _written(folder / "fuzzed.json", data)
    check_cli(path, registry)
    try:
        document = load_document(path)
    except ValidationError as error:
        with_codes(error.errors)
        return
    check_document(document, registry)


def _written(path: Path, data: bytes) -> Path:
    path.unlink(missing_ok=True)  # a new file: overwriting one in place can wait for the disk (ext4 auto_da_alloc)
    path.write_bytes(data)
    return path


def check_cli(path: Path, registry: NodeRegistry) -> None:
    """`graphflow validate` exits 0 or 1 and prints one line per problem, or JSON, on an ASCII-only stdout."""
    parser = command_parser()
    for extra in ([], ["--json"]):
        written = io.BytesIO()
        stdout = io.TextIOWrapper(written, encoding="ascii", newline="\n")
        # the command as it runs, but with the registry and argument parser made once rather than per call
        with contextlib.redirect_stdout(stdout), mock.patch.multiple(cli, default_registry=lambda plugins: registry,
                                                                     command_parser=lambda: parser):
            status = cli.main(["validate", str(path), *extra])
        stdout.flush()
        text = written.getvalue().decode("ascii")
        assert status in (0, 1), status
        if extra:
            report = json.loads(text)
            assert report["valid"] == (status == 0) and all(error["code"] in CODES for error in report["errors"])
        else:
            lines = text.splitlines()
            assert len(lines) >= 1 and all(line.startswith("  [") for line in lines[1:]), text


@cache
def command_parser() -> Any:
    return cli.command_parser()


def check_cheap(document: dict[str, Any], engine: Engine) -> None:
    """A valid cheap document runs (a node may fail, as Math dividing by zero does) and runs the same again."""
    try:
        result = engine.run(document, cancel=CancelToken())
    except NodeExecutionError:
        return
    assert repr(engine.run(document).outputs) == repr(result.outputs)


_SHORT = reprlib.Repr()  # bounded, for examples nested thousands deep
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 12, 12, 12, 80, 400


def _size(value: Any) -> int:
    """Values and characters in `value`, counted without recursion (and without end: at most 10**6)."""
    count, stack = 0, [value]
    while stack and count < 10**6:
        item = stack.pop()
        count += 1 + (len(item) if isinstance(item, (str, bytes)) else 0)
        if isinstance(item, dict):
            stack.extend((*item.keys(), *item.values()))
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return count


def _signature(error: BaseException) -> str:
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if "/graphflow/" in frame.filename or "/nodes/" in frame.filename] or \
        traceback.extract_tb(error.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"
    return f"{type(error).__name__} at {where}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000, help="documents to try (default: 10,000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    registry = default_registry()
    engine = Engine(registry, cache_bytes=64 << 20)
    originals = [path.read_bytes() for path in sorted(GRAPHS.rglob("*.json"))]
    crashes: dict[str, Any] = {}
    tracebacks = 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.count):
            rng = random.Random(f"{args.seed}-{index}")
            kind = index % 4
            subject: Any = random_document(rng, registry) if kind in (0, 3) else \
                mutated_text(rng, originals) if kind == 1 else cheap_document(rng)
            try:
                if kind == 1:
                    check_text(subject, registry, Path(folder))
                elif kind == 3:  # a Python caller's param values, checked by validation alone
                    subject = (subject, param_values(rng, subject))
                    check_values(*subject, registry)
                else:
                    check_generated(subject, registry, Path(folder), assignments(rng))
                if kind == 2:
                    check_cheap(subject, engine)
            except Exception as error:  # every one is a finding: count it, keep the smallest example
                tracebacks += 1
                signature = _signature(error)
                if signature not in crashes or _size(subject) < _size(crashes[signature]):
                    crashes[signature] = subject
    seconds = time.perf_counter() - started
    print(f"{args.count} documents, {tracebacks} tracebacks, {seconds / args.count * 1e3:.2f} ms per document")
    for signature, example in sorted(crashes.items()):
        shown = _SHORT.repr(example).encode("ascii", "backslashreplace").decode("ascii")
        print(f"  {signature}\n    smallest example ({_size(example)} values and characters): {shown}")


if __name__ == "__main__":
    main()
