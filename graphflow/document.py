"""Graph documents on disk: parsing, format migration and canonical, byte-stable saving.

A document stays plain JSON data (dicts and lists) until `compile_document` turns it into an
executable graph, so what a user wrote is what is saved: nodes, params and inputs keep their
order, structural keys take a canonical order, and the text is two-space indented.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from graphflow.atomic import atomic_write
from graphflow.errors import Code, GraphError, ValidationError
from graphflow.paths import file_kind
from graphflow.types import show_value

FORMAT_VERSION = 1
# Node ids and param names; always fullmatch, since "$" would let a trailing newline in.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
MAX_DEPTH = 64  # containers inside containers; real documents nest about six deep
MAX_VALUES = 1_000_000  # containers and what they hold, counted as a JSON writer would: a shared container twice
MAX_DOCUMENT_BYTES = 64 << 20
# MIGRATIONS[n] turns a format-n document into a format-(n + 1) one; load applies them in turn.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}

_TOP_ORDER = ("$schema", "graphflow", "name", "description", "params", "nodes", "outputs")
_NODE_ORDER = ("type", "template", "version", "inputs")
_PARAM_ORDER = ("type", "list", "default", "description", "min", "max", "choices")


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
    """The text of a document file. Only regular files are read: a FIFO or a device would block or never end."""
    try:
        with open(path, "rb", opener=_open_nonblocking) as file:
            kind = file_kind(os.fstat(file.fileno()).st_mode)
            data = file.read(MAX_DOCUMENT_BYTES + 1) if kind is None else b""
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        reason = error.strerror if isinstance(error, OSError) else str(error)
        raise ValidationError([GraphError(Code.FILE_NOT_FOUND, f"cannot read {path}: {reason}",
                                          expected="a readable graph document", found=str(path))]) from None
    if kind is not None:
        raise ValidationError([GraphError(Code.FILE_NOT_FOUND, f"cannot read {path}: it is {kind}",
                                          expected="a regular file holding a graph document", found=kind)])
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ValidationError([GraphError(Code.INVALID_JSON, f"{path} is larger than {MAX_DOCUMENT_BYTES >> 20} MiB",
                                          expected="a graph document of ordinary size", found="a larger file")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValidationError([GraphError(Code.INVALID_JSON, f"{path} is not UTF-8 text: {error.reason} at byte "
                                          f"{error.start}", expected="UTF-8 JSON", found=str(path))]) from None


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))  # opening a FIFO must not wait for a writer


def migrate(data: dict[str, Any], *, check_shape: bool = True) -> dict[str, Any]:
    """Bring a document of an older format to FORMAT_VERSION; refuse formats we do not know.

    Everything must be JSON data first: objects with text keys, lists, text, numbers, true, false and null,
    at most MAX_DEPTH containers deep, so that nothing downstream recurses into an absurd structure. A caller
    that has already checked the parts it will read (see `compile_document`) passes `check_shape=False`.
    """
    problems = shape_errors(data) if check_shape else []
    if problems:
        raise ValidationError(problems)
    version = data.get("graphflow")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValidationError([GraphError(
            Code.UNSUPPORTED_VERSION, 'a graph document starts with the format tag "graphflow": '
            f"{FORMAT_VERSION}", input="graphflow", expected=f"an integer format version <= {FORMAT_VERSION}",
            found=show_value(version))])
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


def shape_errors(data: Any) -> list[GraphError]:
    """Everything in `data` that is not JSON data, nested too deep or too large; found without recursion.

    A container shared by two places is walked in each, as a JSON writer would write it twice, so depth is
    measured along every path and the walk stops after MAX_VALUES values (a document that contains itself, or
    shares its way to an astronomic size, ends there or at MAX_DEPTH). Nodes and outputs of the usual shape
    are recognised at a glance first: only what is not ordinary gets the full walk.
    """
    if type(data) is dict and all(type(key) is str for key in data):
        unusual = {key: value for key, value in data.items() if not _ordinary_part(key, value)}
        if len(unusual) < len(data):
            return shape_errors(unusual) if unusual else []
    errors: list[GraphError] = []
    stack: list[tuple[dict[Any, Any] | list[Any], tuple[Any, ...]]] = [(data, ())]
    walked = 0
    while stack and len(errors) < 100:
        value, path = stack.pop()
        if len(path) >= MAX_DEPTH:
            error = _shape_error(path, f"nests containers more than {MAX_DEPTH} levels deep (or contains itself)",
                                 f"at most {MAX_DEPTH} levels", "deeper nesting")
            if not any((known.node, known.input) == (error.node, error.input) for known in errors):
                errors.append(error)  # once per node input: its other deep places say nothing new
            continue
        walked += 1 + len(value)
        if walked > MAX_VALUES:
            errors.append(_shape_error((), f"holds more than {MAX_VALUES:,} values", f"at most {MAX_VALUES:,} values",
                                       "a larger document"))
            break
        stack.extend((item, (*path, key)) for key, item in _containers_in(value, path, errors))
    return errors


_PLAIN = frozenset({str, int, float, bool, type(None), dict, list})
_SCALAR_KINDS = frozenset({str, int, float, bool, type(None)})


def _ordinary_part(key: str, value: Any) -> bool:
    """A top-level scalar, `nodes` whose entries are all of the usual shape, or `outputs` mapping text to text."""
    kind = type(value)
    if kind in _SCALAR_KINDS:
        return True
    if kind is not dict:
        return False
    if key == "outputs":
        return _flat(value)
    return key == "nodes" and all(type(node) is str and type(entry) is dict and copy_entry(entry) is not None
                                  for node, entry in value.items())


def copy_entry(entry: dict[Any, Any]) -> tuple[dict[str, Any], bool, EntryKinds] | None:
    """A copy of a node entry of the usual shape (scalars, and `inputs` of scalars, flat links or params, or lists of
    those), whether it uses a param, and its `EntryKinds`; None for an entry of any other shape (the full walk's)."""
    copied: dict[str, Any] = {}
    uses_params = False
    kinds: list[tuple[str, type, Any]] = []
    for key, value in entry.items():
        if type(key) is not str:
            return None
        if type(value) in _SCALAR_KINDS:
            copied[key] = value
            continue
        if key != "inputs" or type(value) is not dict:
            return None
        inputs: dict[str, Any] = {}
        for name, item in value.items():
            kind = type(item)
            if type(name) is not str:
                return None
            if kind is dict:
                if len(item) == 1:  # a link or a param, nearly always: the quick path
                    ((inner, target),) = item.items()
                    if type(inner) is not str or type(target) not in _SCALAR_KINDS:
                        return None
                    item = {inner: target}
                    uses_params = uses_params or inner == "param"
                elif _flat(item):
                    item = dict(item)
                    uses_params = uses_params or "param" in item
                else:
                    return None
            elif kind is list:
                if not all(type(x) in _SCALAR_KINDS or (type(x) is dict and _flat(x)) for x in item):
                    return None
                item = [dict(x) if type(x) is dict else x for x in item]
                uses_params = uses_params or any(type(x) is dict and "param" in x for x in item)
                kinds.append((name, list, item_kinds(item)))
            elif kind not in _SCALAR_KINDS:
                return None
            elif kind is float:
                kinds.append((name, kind, item == 0.0 and math.copysign(1.0, item) < 0))
            elif kind is int or kind is bool:
                kinds.append((name, kind, False))
            inputs[name] = item
        copied[key] = inputs
    return copied, uses_params, tuple(kinds)


# For each input whose value Python's == could take for another (True == 1 == 1.0, 0.0 == -0.0; lists of them):
# (input name, the value's type, whether it is -0.0 or, for a list, its items' kinds). Links, params and text
# need none: only text equals text.
EntryKinds = tuple[tuple[str, type, Any], ...]


def negative_zero(value: float) -> bool:
    return value == 0.0 and math.copysign(1.0, value) < 0


def item_kinds(items: list[Any]) -> tuple[tuple[type, bool], ...]:
    return tuple((type(item), type(item) is float and negative_zero(item)) for item in items)


def _flat(mapping: dict[Any, Any]) -> bool:
    return all(type(key) is str and type(value) in _SCALAR_KINDS for key, value in mapping.items())


def private_document(document: dict[str, Any], shared: Collection[str] = (), before: dict[str, Any] | None = None,
                     before_kinds: dict[str, EntryKinds] | None = None, before_users: frozenset[str] = frozenset()
                     ) -> tuple[dict[str, Any], frozenset[str], dict[str, EntryKinds]]:
    """A copy of `document` that later changes to the caller's dict cannot reach, checked on the way to be JSON
    data of bounded size (ValidationError listing what is not, as `shape_errors` finds it), the ids of its nodes
    that use a param, and the `EntryKinds` of its entries (none for entries of an unusual shape). The entries of
    the `shared` node ids are equal to those of an earlier copy (`before`, with `before_kinds`; `before_users`
    used params), checked then: they are taken from it as they are."""
    import copy as copying

    users = {node_id for node_id in before_users if node_id in shared}
    kinds: dict[str, EntryKinds] = {}
    nodes: dict[Any, Any] | None = None  # the copies of the entries, None where an entry needs the full walk
    unusual: dict[str, Any] = {}  # what needs the full walk
    flat_outputs = type(document.get("outputs")) is dict and _flat(document["outputs"])
    for key, value in document.items():
        if key == "nodes" and type(value) is dict:
            nodes = {}
            for node_id, entry in value.items():
                if node_id in shared:
                    nodes[node_id], kinds[node_id] = before[node_id], before_kinds[node_id]  # type: ignore[index]
                    continue
                copied = copy_entry(entry) if type(node_id) is str and type(entry) is dict else None
                if copied is None:
                    unusual.setdefault("nodes", {})[node_id] = entry
                    nodes[node_id] = None
                    continue
                nodes[node_id], uses, kinds[node_id] = copied
                if uses:
                    users.add(node_id)
        elif not (type(value) in _SCALAR_KINDS or (key == "outputs" and flat_outputs)):
            unusual[key] = value
    problems = shape_errors(unusual) if unusual else []
    if problems:
        raise ValidationError(problems)
    copy: dict[str, Any] = {}
    for key, value in document.items():
        if key == "nodes" and nodes is not None:
            copy[key] = {node_id: copying.deepcopy(value[node_id]) if entry is None else entry
                         for node_id, entry in nodes.items()}
        elif key == "outputs" and flat_outputs:
            copy[key] = dict(value)
        else:  # checked above: scalars, or JSON data of bounded size
            copy[key] = copying.deepcopy(value)
    return copy, frozenset(users), kinds


def _containers_in(value: dict[Any, Any] | list[Any], path: tuple[Any, ...],
                   errors: list[GraphError]) -> list[tuple[Any, Any]]:
    """The (key, container) pairs directly inside `value`; what is not JSON data goes to `errors`."""
    containers = []
    is_dict = isinstance(value, dict)
    for key, item in value.items() if is_dict else enumerate(value):
        kind = type(item)
        if (is_dict and type(key) is not str) or kind not in _PLAIN:  # the usual case skips the closer look
            problems = _item_errors(value, path, key, item)
            errors.extend(problems)
            if not problems and isinstance(item, (dict, list)):
                containers.append((key, item))
        elif kind is dict or kind is list:
            containers.append((key, item))
    return containers


def _item_errors(container: Any, path: tuple[Any, ...], key: Any, item: Any) -> list[GraphError]:
    if isinstance(container, dict) and not isinstance(key, str):
        return [_shape_error(path, "has a key that is not text", "text keys", f"{type(key).__name__} key")]
    if item is None or isinstance(item, (str, int, float, dict, list)):
        return []
    return [_shape_error((*path, key), f"holds a Python {type(item).__name__} value, which JSON cannot write",
                         "objects, lists, text, numbers, true, false or null", f"{type(item).__name__} value")]


def _shape_error(path: tuple[Any, ...], problem: str, expected: str, found: str) -> GraphError:
    """An error about the value at `path`, placed on its node and input when it lies in one."""
    node = input = None
    if len(path) > 1 and path[0] == "nodes":
        node = path[1]
        input = path[3] if len(path) > 3 and path[2] == "inputs" else None
    elif path:
        input = path[0]
    shown = "/".join(str(part) for part in path[:8]) + ("/..." if len(path) > 8 else "")
    return GraphError(Code.INVALID_DOCUMENT, f"the document {problem}" + (f" at /{shown}" if path else ""),
                      node if isinstance(node, str) else None, input if isinstance(input, str) else None,
                      expected, found)


def dumps(document: dict[str, Any]) -> str:
    """Canonical text of a document: fixed order for structural keys, user order elsewhere.

    Two-space indent, one line per node and per param; any object or list that fits on one line
    of LINE_WIDTH is written on one line, as people write links (`{"from": "photo.image"}`).
    """
    problems = shape_errors(document)  # what JSON cannot write, or nesting that would exhaust the stack
    if problems:
        raise ValidationError(problems)
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
