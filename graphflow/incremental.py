"""What a compile keeps from the previous compile of the same document: every node whose entry is the same.

Recompiling a 1,000-node document because one value changed would validate 999 unchanged nodes
again. Instead the compiler compares each top-level entry with a private copy of the entry the
previous compile validated, and keeps that compile's node when nothing it was checked against
changed: its entry (compared strictly: in Python `True == 1` and `1 == 1.0`, here they differ),
the params it uses, and the node types of the nodes it links to.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphflow.cache import file_digest
from graphflow.document import EntryKinds, copy_entry, item_kinds, negative_zero

if TYPE_CHECKING:
    from graphflow.compiled import CompiledGraph, CompiledNode, Link
    from graphflow.node import Node
    from graphflow.registry import NodeRegistry


class Reuse:
    """What one compile takes from `previous`, the last compile of the same document.

    `kept` starts as the plain top-level nodes whose entries (and params, if they use any) are
    unchanged; `settle` then drops those linked to a node whose type changed, since their links
    were checked against the old type. Nodes are kept by identity, so their remembered cache keys
    (`CompiledNode.key_memo`) come along.
    """

    def __init__(self, previous: CompiledGraph, document: dict[str, Any], values: dict[str, Any],
                 registry: NodeRegistry) -> None:
        self.previous = previous
        self.kept: dict[str, CompiledNode] = {}
        self.retyped: set[str] = set()  # previous node ids now absent, of another type, or inside a template
        self._params_same = (same_values(values, previous.given_params) and previous.document is not None
                             and same_values(document.get("params", {}), previous.document.get("params", {})))
        entries = document.get("nodes")
        if previous.document is None or type(entries) is not dict:
            return
        before, kept, nodes, kinds = previous.document["nodes"], self.kept, previous.nodes, previous.entry_kinds
        # a registry maps a name to one class for good (it refuses redefinitions): the same registry needs no lookup
        same_registry = previous.registry is registry
        blocked = frozenset() if self._params_same else previous.param_users
        for node_id, entry in entries.items():
            node = nodes.get(node_id)  # top-level ids hold no "/": this is a plain top-level node
            if (node is not None and node_id not in blocked and same_entry(entry, before[node_id], kinds.get(node_id))
                    and (same_registry or registry.get(entry["type"]) is node.node_type)):
                kept[node_id] = node

    def unchanged(self, document: dict[str, Any]) -> bool:
        """Whether `document` (with the values given to __init__) is exactly what `previous` was compiled from."""
        previous, before = self.previous, self.previous.document or {}
        nodes, kept_entries = document.get("nodes"), before.get("nodes", {})
        if (not self._params_same or document.keys() != before.keys() or type(nodes) is not dict
                or list(nodes) != list(kept_entries) or document.get("outputs") != before.get("outputs")):
            return False  # outputs map names to strings, which only strings equal: == is exact there
        if not all(same_values(value, before[key]) for key, value in document.items()
                   if key not in ("nodes", "outputs", "params")):
            return False
        kinds = previous.entry_kinds
        if len(self.kept) != len(nodes) and not all(
                node_id in self.kept or same_entry(entry, kept_entries[node_id], kinds.get(node_id))
                for node_id, entry in nodes.items()):
            return False  # a template node's entry is compared here: only plain nodes are kept
        return templates_unchanged(previous)

    def settle(self, classes: dict[str, type[Node] | None]) -> dict[str, CompiledNode]:
        """Drop the kept nodes linked to a node whose type changed; `classes` are the new top-level node types."""
        previous = self.previous.nodes
        self.retyped = {node_id for node_id in previous.keys() - self.kept.keys()
                        if "/" in node_id or classes.get(node_id) is not previous[node_id].node_type}
        if self.retyped:
            self.kept = {node_id: node for node_id, node in self.kept.items() if self.retyped.isdisjoint(node.sources)}
        return self.kept

    def outputs(self, document: dict[str, Any], classes: dict[str, type[Node] | None]) -> dict[str, Link]:
        """The previous graph outputs written as before that name a node of the same type as before."""
        previous = self.previous
        before = previous.document.get("outputs", {}) if previous.document is not None else {}
        raw = document.get("outputs")
        if type(raw) is not dict:
            return {}
        if not self.retyped and raw == before:
            return dict(previous.outputs)
        return {name: link for name, target in raw.items() if (link := previous.outputs.get(name)) is not None
                and target == before.get(name) and "/" not in link.node
                and classes.get(link.node) is previous.nodes[link.node].node_type}

    def order(self, graph: CompiledGraph) -> tuple[str, ...] | None:
        """The previous topological order, when the nodes and their links are those of the previous graph."""
        previous = self.previous
        if self.retyped or list(graph.nodes) != list(previous.nodes):
            return None
        if any(graph.nodes[node_id].sources != previous.nodes[node_id].sources
               for node_id in graph.nodes.keys() - self.kept.keys()):
            return None
        return previous.order

def templates_unchanged(graph: CompiledGraph) -> bool:
    """Whether every template path the graph was compiled from still names the same file (symlinks along it may
    have been pointed elsewhere), and every template file still holds the same bytes."""
    return (all(_resolved(written) == path for written, path in graph.template_references.items())
            and all(_digest_of(path) == digest for path, digest in graph.template_files.items()))


def _resolved(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        return None


def _digest_of(path: Path) -> str | None:
    try:
        return file_digest(path.read_bytes())
    except OSError:
        return None


def same_entry(entry: Any, kept: dict[str, Any], kinds: EntryKinds | None = None) -> bool:
    """Whether `entry` is exactly the validated entry `kept` (whose `kinds` are known, or worked out here): equal,
    with every input value of the same type."""
    if entry != kept:  # equality first: it is fast, and false for nearly every changed entry
        return False
    if kinds is None:
        found = copy_entry(kept)
        kinds = found[2] if found is not None else None
        if kinds is None:
            return False  # not of the usual shape: no claim to be the same
    if not kinds:
        return True
    inputs = entry["inputs"]
    for name, kind, detail in kinds:
        value = inputs[name]
        if type(value) is not kind:
            return False
        if kind is float:
            if negative_zero(value) is not detail:
                return False
        elif kind is list and item_kinds(value) != detail:
            return False
    return True


def _same_scalar(value: Any, old: Any) -> bool:
    """Equal values of one type, -0.0 apart from 0.0."""
    return type(value) is type(old) and (type(value) is not float or negative_zero(value) is negative_zero(old))


def same_values(value: Any, old: Any) -> bool:
    """Strict equality of small JSON-like values (param values): types must match at every level."""
    if type(value) is not type(old):
        return False
    if isinstance(value, dict):
        return value.keys() == old.keys() and all(same_values(value[key], old[key]) for key in value)
    if isinstance(value, (list, tuple)):
        return len(value) == len(old) and all(map(same_values, value, old))
    return value == old and _same_scalar(value, old)
