"""Graph documents on disk: parsing, format migration and canonical, byte-stable saving.

A document stays plain JSON data (dicts and lists) until `compile_document` turns it into an
executable graph, so what a user wrote is what is saved: nodes, params and inputs keep their
order, structural keys take a canonical order, and the text is two-space indented.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphflow.atomic import atomic_write
from graphflow.errors import Code, GraphError, ValidationError

FORMAT_VERSION = 1
# MIGRATIONS[n] turns a format-n document into a format-(n + 1) one; load applies them in turn.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}

_TOP_ORDER = ("$schema", "graphflow", "name", "description", "params", "nodes", "outputs")
_NODE_ORDER = ("type", "template", "version", "inputs")
_PARAM_ORDER = ("type", "default", "description", "min", "max", "choices")


def parse_document(text: str, source: str = "<document>") -> dict[str, Any]:
    """Parse document text and migrate it to the current format."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as duplicate:
        raise ValidationError([GraphError(
            Code.INVALID_JSON, f"{source} names {duplicate.key!r} twice in one object; JSON parsers would keep "
            "only the last one", expected="unique keys", found=repr(duplicate.key))]) from None
    except json.JSONDecodeError as error:
        raise ValidationError([GraphError(
            Code.INVALID_JSON, f"{source} is not valid JSON: {error.msg} at line {error.lineno}, "
            f"column {error.colno}", expected="a JSON object", found=f"text at line {error.lineno}")]) from None
    except (ValueError, RecursionError) as error:  # integers past Python's digit limit, absurd nesting
        raise ValidationError([GraphError(Code.INVALID_JSON, f"{source} cannot be read: {error}",
                                          expected="a JSON object of ordinary size", found="oversized JSON")]) from None
    if not isinstance(data, dict):
        raise ValidationError([GraphError(Code.INVALID_DOCUMENT, f"{source} must hold a JSON object",
                                          expected="an object", found=type(data).__name__)])
    return migrate(data)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def load_document(path: str | Path) -> dict[str, Any]:
    """Read and migrate a document file."""
    return parse_document(read_document_text(path), str(path))


def read_document_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValidationError([GraphError(Code.INVALID_JSON, f"{path} is not UTF-8 text: {error.reason} at byte "
                                          f"{error.start}", expected="UTF-8 JSON", found=str(path))]) from None
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        reason = error.strerror if isinstance(error, OSError) else str(error)
        raise ValidationError([GraphError(Code.FILE_NOT_FOUND, f"cannot read {path}: {reason}",
                                          expected="a readable graph document", found=str(path))]) from None


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring a document of an older format to FORMAT_VERSION; refuse formats we do not know."""
    version = data.get("graphflow")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValidationError([GraphError(
            Code.UNSUPPORTED_VERSION, 'a graph document starts with the format tag "graphflow": '
            f"{FORMAT_VERSION}", input="graphflow", expected=f"an integer format version <= {FORMAT_VERSION}",
            found=repr(version))])
    while version < FORMAT_VERSION and version in MIGRATIONS:
        data = MIGRATIONS[version](data)
        version += 1
        data["graphflow"] = version
    if version != FORMAT_VERSION:
        newer = "a newer graphflow wrote it; upgrade graphflow" if version > FORMAT_VERSION else \
            "no migration exists from that format"
        raise ValidationError([GraphError(
            Code.UNSUPPORTED_VERSION, f"format {version} is not supported: {newer}", input="graphflow",
            expected=f"format {FORMAT_VERSION}", found=str(version))])
    return data


def dumps(document: dict[str, Any]) -> str:
    """Canonical text of a document: fixed order for structural keys, user order elsewhere.

    Two-space indent, one line per node and per param; any object or list that fits on one line
    of LINE_WIDTH is written on one line, as people write links (`{"from": "photo.image"}`).
    """
    return _format(canonical(document), 0, 0, expand=True, expand_members=frozenset({"nodes", "params"})) + "\n"


LINE_WIDTH = 120


def _format(value: Any, indent: int, used: int, *, expand: bool = False,
            expand_members: frozenset[str] = frozenset()) -> str:
    """`value` as JSON text starting at column `used`, nested `indent` spaces deep.

    `expand` forces one item per line; `expand_members` names the members forced likewise.
    """
    flat = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    if not isinstance(value, (dict, list)) or not value or (not expand and used + len(flat) + 1 <= LINE_WIDTH):
        return flat
    inner = indent + 2
    pad = " " * inner
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            head = f"{pad}{json.dumps(key, ensure_ascii=False)}: "
            items.append(head + _format(item, inner, len(head), expand=key in expand_members))
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return "[\n" + ",\n".join(pad + _format(item, inner, inner) for item in value) + "\n" + " " * indent + "]"


def save_document(document: dict[str, Any], path: str | Path) -> None:
    """Write the canonical text atomically."""
    atomic_write(Path(path), dumps(document).encode("utf-8"))


def canonical(document: dict[str, Any]) -> dict[str, Any]:
    out = _ordered(document, _TOP_ORDER)
    if isinstance(out.get("params"), dict):
        out["params"] = {name: _ordered(spec, _PARAM_ORDER) if isinstance(spec, dict) else spec
                         for name, spec in out["params"].items()}
    if isinstance(out.get("nodes"), dict):
        out["nodes"] = {node_id: _ordered(entry, _NODE_ORDER) if isinstance(entry, dict) else entry
                        for node_id, entry in out["nodes"].items()}
    return out


def _ordered(mapping: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    first = {key: mapping[key] for key in order if key in mapping}
    rest = {key: mapping[key] for key in sorted(mapping) if key not in first}
    return first | rest
