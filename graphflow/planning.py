"""What a run needs: the nodes its targets depend on, the bytes of their input files, and every node's cache key.

A cache key is made from what is known before anything runs: the node's literal inputs, the keys of
the nodes it reads from, the digests of the files it reads (and the fingerprints of the model
sources it loads), and the engine options it uses. The bytes hashed into a key are the bytes the
node is handed (`RunContext.read_file`), so a file rewritten after planning cannot be stored under
the old key. Keys are remembered per node: a run recomputes only the keys downstream of what
changed, whether in the document or in a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from graphflow.cache import cache_key, file_digest, key_parts
from graphflow.compiled import CompiledGraph, CompiledNode
from graphflow.errors import Code, GraphError, ValidationError
from graphflow.node import Node
from graphflow.paths import PathError, PathPolicy

Digests = dict[tuple[str, str], str]  # (node, input) -> digest of the file, or fingerprint of the model source


@dataclass(frozen=True)
class Plan:
    """The nodes the requested targets depend on, sources before consumers."""

    order: tuple[str, ...]
    targets: frozenset[str]


@dataclass(frozen=True)
class KeyedPlan:
    """One run's plan: the nodes, their cache keys, the bytes of the files they read (by node and input), the
    digests those keys were made from, and the nodes whose results must not be cached (`unknown_sources`)."""

    plan: Plan
    keys: dict[str, str]
    file_bytes: dict[str, dict[str, bytes]] = field(default_factory=dict)
    digests: Digests = field(default_factory=dict)
    uncached: frozenset[str] = frozenset()


def plan_execution(graph: CompiledGraph, targets: list[str]) -> Plan:
    """Plan only what `targets` need, in the order fixed at compile time (networkx, document order)."""
    needed: set[str] = set()
    stack = list(targets)
    while stack:
        node_id = stack.pop()
        if node_id not in needed:
            needed.add(node_id)
            stack.extend(graph.nodes[node_id].sources)
    order = graph.order if len(needed) == len(graph.nodes) else tuple(n for n in graph.order if n in needed)
    return Plan(order, frozenset(targets))


@dataclass
class _PlanMemo:
    """One plan of a graph, and what its last run computed, for the next run of it (or of an edit of it)."""

    plan: Plan
    keyed_inputs: tuple[tuple[str, str, bool], ...]  # (node, input, is a model source) of every file and model input
    # the digests of the last run, the keys made from them, and the nodes whose keys have gone stale since (their
    # entries were edited): one tuple, replaced whole, because threads share the memo
    state: tuple[Digests, dict[str, str], frozenset[str]] | None = None
    unchecked: frozenset[str] = frozenset()  # nodes whose output paths are still to be checked
    resolves_options: bool = False  # some planned node keys engine options: they are resolved first
    keys_document: bool = False  # some planned node keys the document itself (it embeds it: SaveImage)
    consumers: dict[str, list[str]] | None = None  # planned node -> the planned nodes reading it (made on first need)
    position: dict[str, int] | None = None  # planned node -> its place in the order (made on first need)

    def positions(self) -> dict[str, int]:
        if self.position is None:
            self.position = {node_id: index for index, node_id in enumerate(self.plan.order)}
        return self.position


def plan_run(graph: CompiledGraph, targets: list[str], options: Mapping[str, Any], paths: PathPolicy) -> KeyedPlan:
    """The plan for `targets`, with every input file read (and every model source fingerprinted) now, and keys.

    Raises ValidationError listing every output path outside the output root, every unreadable input file and
    every model source outside the input roots, before any node runs.
    """
    memo_key = ("plan", tuple(targets), repr(sorted(options.items())), paths)
    memo: _PlanMemo | None = graph.memo.get(memo_key)
    if memo is None:
        plan = plan_execution(graph, targets)
        _check_output_paths(graph, plan.order, paths)
        keyed = tuple(entry for node_id in plan.order if _keyed_inputs(graph.nodes[node_id].node_type)
                      for entry in _keyed(graph, node_id))
        uses = _options_used(graph, plan.order)
        memo = graph.memo.setdefault(memo_key, _PlanMemo(plan, keyed, resolves_options=bool(uses),
                                                         keys_document=DOCUMENT in uses))
    if memo.unchecked:
        _check_output_paths(graph, [node_id for node_id in memo.plan.order if node_id in memo.unchecked], paths)
        memo.unchecked = frozenset()
    limit = options.get(MAX_INPUT_BYTES_OPTION) or MAX_INPUT_BYTES
    digests, file_bytes = _read_inputs(graph, memo.keyed_inputs, paths, int(limit))
    if memo.resolves_options:
        from graphflow.models.devices import keyed_options

        options = keyed_options(options)
        if memo.keys_document:
            options = {**options, DOCUMENT: document_digest(graph)}
    state = memo.state
    if state is None:
        keys = node_keys(graph, memo.plan.order, digests, options)
    else:
        before, keys, stale = state
        if before != digests:  # a file changed: its readers' keys are stale too
            stale = stale | {owner for (owner, name), digest in digests.items() if before.get((owner, name)) != digest}
        if stale:
            keys = _rekeyed(graph, memo, keys, stale, digests, options)
    memo.state = (digests, keys, frozenset())
    return KeyedPlan(memo.plan, keys, file_bytes, digests, unknown_sources(graph, memo.plan, digests))


DOCUMENT = "document"  # the option that stands for the document and params, for nodes that embed them


def document_digest(graph: CompiledGraph) -> str:
    """A digest of what output nodes embed in their files: the canonical document and the param values."""
    digest = graph.memo.get(DOCUMENT)
    if digest is None:
        from graphflow.document import dumps

        text = (dumps(graph.document) if graph.document is not None else "") + "\n" + \
            json.dumps(graph.params, sort_keys=True, ensure_ascii=True, default=repr)
        digest = graph.memo[DOCUMENT] = file_digest(text.encode("utf-8", "surrogatepass"))
    return digest


def inherit_plans(graph: CompiledGraph, previous: CompiledGraph, changed: frozenset[str]) -> None:
    """Give `graph` the plans of `previous`, a graph of the same nodes and links in which the nodes `changed` had
    other entries: their output paths are checked again at the next run, and only their keys (and those downstream)
    are computed again."""
    for memo_key, memo in list(previous.memo.items()):
        if not isinstance(memo, _PlanMemo):
            continue
        position = memo.positions()
        edited = frozenset(node_id for node_id in changed if node_id in position)
        keyed = tuple(entry for entry in memo.keyed_inputs if entry[0] not in edited) + \
            tuple(entry for node_id in edited for entry in _keyed(graph, node_id))
        state = memo.state
        uses = _options_used(graph, edited)
        # a node keyed by the whole document is stale whenever anything in it changed
        stale = edited | ({node_id for node_id in position if DOCUMENT in graph.nodes[node_id].node_type.uses_options}
                          if memo.keys_document or DOCUMENT in uses else set())
        graph.memo[memo_key] = _PlanMemo(memo.plan, keyed, (state[0], state[1], state[2] | stale) if state else None,
                                         memo.unchecked | edited, memo.resolves_options or bool(uses),
                                         memo.keys_document or DOCUMENT in uses, memo.consumers, position)


def _options_used(graph: CompiledGraph, node_ids: Iterable[str]) -> set[str]:
    """The engine options that the node types of `node_ids` key (a few types serve many nodes)."""
    nodes = graph.nodes
    return set().union(*(node_type.uses_options for node_type in {nodes[node_id].node_type for node_id in node_ids}))


def _keyed(graph: CompiledGraph, node_id: str) -> tuple[tuple[str, str, bool], ...]:
    node = graph.nodes[node_id]
    return tuple((node_id, name, model) for name, model in _keyed_inputs(node.node_type)
                 if isinstance(node.inputs.get(name), str))


def _rekeyed(graph: CompiledGraph, memo: _PlanMemo, keys: dict[str, str], stale: frozenset[str] | set[str],
             digests: Digests, options: Mapping[str, Any]) -> dict[str, str]:
    """`keys` with the keys of the `stale` nodes and of every node downstream of them made again."""
    if memo.consumers is None:
        consumers: dict[str, list[str]] = {}
        for node_id in memo.plan.order:
            for source in graph.nodes[node_id].sources:
                consumers.setdefault(source, []).append(node_id)
        memo.consumers = consumers
    cone: set[str] = set()
    pending = list(stale)
    while pending:
        node_id = pending.pop()
        if node_id not in cone:
            cone.add(node_id)
            pending.extend(memo.consumers.get(node_id, ()))
    position = memo.positions()
    keys = dict(keys)
    files = _files_by_node(digests)
    for node_id in sorted(cone, key=position.__getitem__):
        keys[node_id] = _node_key(graph.nodes[node_id], keys, files.get(node_id), options)
    return keys


@cache
def _keyed_inputs(node_type: type[Node]) -> tuple[tuple[str, bool], ...]:
    return tuple((spec.name, spec.model) for spec in node_type.inputs if spec.file or spec.model)


def changed_sources(node: CompiledNode, keyed: KeyedPlan, paths: PathPolicy) -> list[str]:
    """The model sources of `node` whose files no longer match the fingerprints its key was made from."""
    changed = []
    for name, model in _keyed_inputs(node.node_type):
        planned = keyed.digests.get((node.id, name))
        if model and planned is not None and \
                model_digest(node.inputs[name], paths.beside(node.folders), node.id, name) != planned:
            changed.append(str(node.inputs[name]))
    return changed


@cache
def _output_paths(node_type: type[Node]) -> tuple[str, ...]:
    return tuple(spec.name for spec in node_type.inputs if spec.output_path)


def _check_output_paths(graph: CompiledGraph, node_ids: Sequence[str], paths: PathPolicy) -> None:
    """Refuse, before anything runs, output paths that would leave the output root."""
    errors: list[GraphError] = []
    for node_id in node_ids:
        node = graph.nodes[node_id]
        for name in _output_paths(node.node_type):
            if isinstance(node.inputs.get(name), str):
                try:
                    paths.output_path(node.inputs[name], node=node_id, input=name)
                except PathError as error:
                    errors.append(error.error)
    if errors:
        raise ValidationError(errors)


def path_errors(graph: CompiledGraph, paths: PathPolicy) -> list[GraphError]:
    """Every literal file input that is missing or outside the input roots and every output path outside the output
    root, found without reading a file (`graphflow validate`, a service submit). Model sources are left to planning,
    which can tell a local path from a hub id."""
    errors: list[GraphError] = []
    for node in graph.nodes.values():
        files = _file_inputs(node.node_type)
        if not files and not _output_paths(node.node_type):
            continue
        beside = paths.beside(node.folders)
        for name in files:
            if isinstance(node.inputs.get(name), str):
                try:
                    beside.input_path(node.inputs[name], node=node.id, input=name)
                except PathError as error:
                    errors.append(error.error)
    try:
        _check_output_paths(graph, list(graph.nodes), paths)
    except ValidationError as error:
        errors.extend(error.errors)
    return errors


@cache
def _file_inputs(node_type: type[Node]) -> tuple[str, ...]:
    return tuple(spec.name for spec in node_type.inputs if spec.file)


MAX_INPUT_BYTES = 2 << 30  # an input file larger than this is refused before it is read (the option raises it)
MAX_INPUT_BYTES_OPTION = "max_input_bytes"


def _read_inputs(graph: CompiledGraph, keyed: tuple[tuple[str, str, bool], ...], paths: PathPolicy,
                 limit: int) -> tuple[dict[tuple[str, str], str], dict[str, dict[str, bytes]]]:
    """The digest of every input file (of at most `limit` bytes) and the fingerprint of every model source, and the
    files' bytes.

    Every problem is reported at once. A model that cannot be found is left to its loader to explain (it knows
    which files it needs and how to get them); one outside the input roots is refused here.
    """
    digests: dict[tuple[str, str], str] = {}
    file_bytes: dict[str, dict[str, bytes]] = {}
    errors: list[GraphError] = []
    for node_id, name, model in keyed:
        node = graph.nodes[node_id]
        value, beside = node.inputs[name], paths.beside(node.folders)
        try:
            if model:
                digests[node_id, name] = model_digest(value, beside, node_id, name)
                continue
            data = _read(beside, value, node_id, name, limit)
        except PathError as error:
            errors.append(error.error)
            continue
        digests[node_id, name] = file_digest(data)
        file_bytes.setdefault(node_id, {})[name] = data
    if errors:
        raise ValidationError(errors)
    return digests, file_bytes


def model_digest(value: str, paths: PathPolicy, node_id: str, name: str) -> str:
    """What a model input contributes to its node's key: the source as written and the fingerprint of its files
    (nothing after the "@" when no loadable source has that name yet: see `unknown_sources`)."""
    from graphflow.models.sources import fingerprint  # here, not at import: `import graphflow` stays light

    return f"{value!r}@{fingerprint(value, paths, node=node_id, input=name)}"


def unknown_sources(graph: CompiledGraph, plan: Plan, digests: Digests) -> frozenset[str]:
    """The nodes whose keys rest on a named model source with no fingerprint (a hub model that its loader will
    download, say), and every node downstream of them: their results are not cached, since their keys cannot
    tell which files they used. (A blank source, such as an empty config input, names nothing: it is known.)"""
    unknown = {owner for (owner, name), digest in digests.items() if digest.endswith("@")
               and str(graph.nodes[owner].inputs[name]).strip()}
    if not unknown:
        return frozenset()
    for node_id in plan.order:
        if node_id not in unknown and not unknown.isdisjoint(graph.nodes[node_id].sources):
            unknown.add(node_id)
    return frozenset(unknown)


def _read(paths: PathPolicy, value: str, node_id: str, name: str, limit: int) -> bytes:
    path = paths.input_path(value, node=node_id, input=name)
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            data = file.read(limit + 1) if size <= limit else b""
        if size > limit or len(data) > limit:  # (a file still growing is caught by the length read)
            raise PathError(GraphError(
                Code.VALUE_OUT_OF_RANGE, f"{path} holds {max(size, len(data)):,} bytes, more than an input file may "
                f"({limit:,}; the engine option {MAX_INPUT_BYTES_OPTION} allows more)", node_id, name,
                f"a file of at most {limit:,} bytes", value))
        return data
    except OSError as error:  # unreadable, or gone since it was found
        raise PathError(GraphError(Code.FILE_NOT_FOUND, f"cannot read {path}: {error.strerror or error}", node_id,
                                   name, "a readable file", value)) from None
    except MemoryError:
        raise PathError(GraphError(Code.VALUE_OUT_OF_RANGE, f"{path} does not fit in memory", node_id, name,
                                   "a file that fits in memory", value)) from None


def node_keys(graph: CompiledGraph, order: tuple[str, ...], digests: Digests,
              options: Mapping[str, Any]) -> dict[str, str]:
    """Every planned node's cache key."""
    files = _files_by_node(digests)
    keys: dict[str, str] = {}
    nodes = graph.nodes
    for node_id in order:
        keys[node_id] = _node_key(nodes[node_id], keys, files.get(node_id) if files else None, options)
    return keys


def _files_by_node(digests: Digests) -> dict[str, dict[str, str]]:
    files: dict[str, dict[str, str]] = {}
    for (owner, name), digest in digests.items():
        files.setdefault(owner, {})[name] = digest
    return files


def _node_key(node: CompiledNode, keys: dict[str, str], files: dict[str, str] | None,
              options: Mapping[str, Any]) -> str:
    """The node's cache key, given its sources' `keys`. A node whose upstream keys, file digests and options are
    those its last key was made from (in this graph or in an earlier compile sharing the node) keeps that key."""
    upstream = tuple(map(keys.__getitem__, node.sources))
    file_part = tuple(files.values()) if files else ()
    uses = node.node_type.uses_options
    option_part = tuple([repr(options.get(name)) for name in uses]) if uses else ()  # repr: 1 and True differ
    memo = node.key_memo
    if memo is not None and memo[0] == upstream and memo[1] == file_part and memo[2] == option_part:
        return memo[3]
    key = cache_key(key_parts(node, keys, files or {}, options))
    node.key_memo = (upstream, file_part, option_part, key)
    return key
