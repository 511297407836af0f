"""One run's execution of its planned nodes, and what the engine knows of each node type to execute it.

`Run` executes the nodes an Engine planned, in order: each is computed here or taken from another run
computing the same key (the engine's flights), stored in its caches, and its inputs are freed after
their last consumer.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any, NamedTuple

from graphflow.compiled import CompiledGraph, CompiledNode, Link, links_in
from graphflow.context import RunContext
from graphflow.errors import Cancelled, GraphError, NodeExecutionError, ValidationError
from graphflow.events import CancelToken, EventHandler, NodeCached, NodeFailed, NodeFinished, NodeStarted
from graphflow.models.manager import RecordingUses
from graphflow.models.sources import ModelChangedError
from graphflow.node import Node
from graphflow.planning import KeyedPlan, changed_sources
from graphflow.types import BOOL, CONDITIONING, FLOAT, IMAGE, INT, LATENT, MASK, PATHS, SCALAR_TYPES, STRING

if TYPE_CHECKING:
    from graphflow.engine import Engine, RunResult

_NO_FILES: dict[str, bytes] = {}  # what nodes without file inputs are handed (never changed)

# values of these types never hold a model handle: a node whose inputs are all of them loads no model
_HANDLE_FREE = frozenset({INT, FLOAT, BOOL, STRING, IMAGE, MASK, LATENT, CONDITIONING, PATHS})


class _Traits(NamedTuple):
    """What the engine needs to know of a node type on every execution, worked out once per type."""

    checks_outputs: bool  # it overrides Node.outputs_still_valid (output nodes check their files still exist)
    # it may use a model (through a handle among its inputs, or loading one from a model input): worth recording
    # which, to check their files after it ran. Types a plugin adds count as carrying handles.
    may_use_models: bool
    reads_models: bool  # it has model inputs, whose sources are checked again after it ran


_TRAITS: dict[type[Node], _Traits] = {}


def node_traits(node_type: type[Node]) -> _Traits:
    traits = _TRAITS.get(node_type)
    if traits is None:
        traits = _TRAITS[node_type] = _Traits(
            node_type.outputs_still_valid is not Node.outputs_still_valid,
            any(spec.model or spec.type not in _HANDLE_FREE for spec in node_type.inputs),
            any(spec.model for spec in node_type.inputs))
    return traits


class Run:
    """One run's execution of its planned nodes, in order, caching each result and freeing inputs early."""

    def __init__(self, engine: Engine, graph: CompiledGraph, keyed: KeyedPlan, live: dict[str, dict[str, Any]],
                 result: RunResult, on_event: EventHandler | None, cancel: CancelToken,
                 options: dict[str, Any]) -> None:
        self.engine = engine
        self.graph = graph
        self.keyed = keyed
        self.live = live
        self.result = result
        self.on_event = on_event
        self.cancel = cancel
        self.options = options

    def execute(self, to_run: list[str]) -> None:
        graph, live = self.graph, self.live
        remaining = Counter(source for node_id in to_run for source in graph.nodes[node_id].sources)
        # identical nodes under different ids share a key: run the first, hand its result to the rest
        repeated = {key for key, count in Counter(self.keyed.keys[node_id] for node_id in to_run).items()
                    if count > 1}
        shared: dict[str, dict[str, Any]] = {}
        for node_id in to_run:
            self.cancel.check()
            node = graph.nodes[node_id]
            key = self.keyed.keys[node_id]
            outputs = shared.get(key)
            if outputs is None:
                outputs = self._obtain(node, key)
                if key in repeated:
                    shared[key] = outputs
            else:
                self._reused(node)
            live[node_id] = outputs
            for source in node.sources:
                remaining[source] -= 1
                if remaining[source] == 0 and source not in self.keyed.plan.targets:
                    del live[source]  # freed after its last consumer; the cache may still hold it

    def _obtain(self, node: CompiledNode, key: str) -> dict[str, Any]:
        """The node's outputs: computed here, or taken from another run computing the same key right now."""
        engine = self.engine
        while True:
            flight = engine.claim(key)
            if flight is None:
                break
            outputs = engine.await_landing(flight, self.cancel)
            if outputs is not None:
                self._reused(node)
                return outputs
            # the other run failed or was cancelled: compute it here (claiming it first)
        outputs = None
        try:
            # another run may have made it since this one was planned
            hit = engine.lookup(node, key, disk=False) if engine.cache.may_hold(key) else None
            if hit is not None:
                self._reused(node)
                outputs = hit
                return hit
            outputs = self._execute(node)
            if node.id not in self.keyed.uncached:
                engine.store(node, key, outputs)
            return outputs
        finally:
            engine.land(key, outputs)

    def _failed(self, node: CompiledNode, error: Exception, *, wrap: bool = True) -> Exception:
        """Report that `node` failed with `error`; what to raise (with `wrap`, the error wrapped with the node's id)."""
        if self.on_event is not None:
            self.on_event(NodeFailed(node.id, node.node_type.type_name, error))
        return NodeExecutionError(node.id, node.node_type.type_name, error) if wrap else error

    def _reused(self, node: CompiledNode) -> None:
        self.result.cached.append(node.id)
        if self.on_event is not None:
            self.on_event(NodeCached(node.id, node.node_type.type_name))

    def _execute(self, node: CompiledNode) -> dict[str, Any]:
        node_type = node.node_type
        type_name, traits = node_type.type_name, node_traits(node_type)
        live = self.live
        values = {name: live[value.node][value.output] if type(value) is Link else
                  _resolve(value, live) if type(value) is list else value for name, value in node.inputs.items()}
        problems = _linked_value_errors(node, values)
        if problems:
            raise self._failed(node, ValidationError(problems), wrap=False)  # a document problem, located
        ctx = RunContext(node.id, type_name, self.engine.paths.beside(node.folders), self.cancel, self.graph.document,
                         self.graph.params, self.options, self.on_event, self.result.files, self.engine.models,
                         self.keyed.file_bytes.get(node.id, _NO_FILES), self.graph, self.keyed.digests)
        if self.on_event is not None:
            self.on_event(NodeStarted(node.id, type_name))
        started = time.perf_counter()
        try:
            if traits.may_use_models:
                with RecordingUses() as used:
                    outputs = self.engine.instance(node_type).run(ctx, **values)
            else:
                used, outputs = frozenset(), self.engine.instance(node_type).run(ctx, **values)
            if not isinstance(outputs, dict) or not outputs.keys() >= node_type.output_map.keys():
                missing = [name for name in node_type.output_map if name not in (outputs or {})]
                raise TypeError(f"{type_name}.run returned no value for outputs {missing}")
            if used:  # what the node read must be what its key says (loaded weights are mapped to their files)
                for source in {source for handle in used for source in handle.sources}:
                    source.check_unchanged()
        except Cancelled:
            raise
        except Exception as error:
            raise self._failed(node, error) from error
        changed = changed_sources(node, self.keyed, self.engine.paths) if traits.reads_models else []
        if changed:
            raise self._failed(node, ModelChangedError(
                f"the files of {', '.join(map(repr, changed))} changed while the node ran, so what it loaded may "
                "not be what the run was planned with; run it again"))
        seconds = self.result.timings[node.id] = time.perf_counter() - started
        self.result.ran.append(node.id)
        if self.on_event is not None:
            self.on_event(NodeFinished(node.id, type_name, seconds))
        return outputs


def _linked_value_errors(node: CompiledNode, values: dict[str, Any]) -> list[GraphError]:
    """Ranges and choices hold for values that arrive through links too: checked before the node runs."""
    problems: list[GraphError] = []
    input_map = node.node_type.input_map
    for name, value in node.inputs.items():
        if type(value) is not Link and not (type(value) is list and links_in(value)):
            continue
        spec = input_map[name]
        if spec.type not in SCALAR_TYPES:
            continue
        for error in spec.check_literal(values[name], node.id):  # literals were checked at compile, again here
            problems.append(GraphError(error.code, f"the value that arrived through a link: {error.message}",
                                       error.node, error.input, error.expected, error.found))
    return problems


def _resolve(value: Any, live: dict[str, dict[str, Any]]) -> Any:
    if isinstance(value, Link):
        return live[value.node][value.output]
    if isinstance(value, list):
        return [_resolve(item, live) for item in value]
    return value
