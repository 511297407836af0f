"""The executor: validate, plan, look up cached results, run the rest, report what happened.

One Engine serves many runs and keeps its cache between them. Results already cached are
reused without touching their upstream nodes; a failing node leaves everything before it
cached, so the next run resumes there.
"""

from __future__ import annotations

import json
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphflow.cache import MemoryCache, cache_key, file_digest, key_parts
from graphflow.compiled import CompiledGraph, CompiledNode, Link
from graphflow.context import RunContext
from graphflow.disk_cache import DiskCache
from graphflow.document import parse_document, read_document_text
from graphflow.errors import Cancelled, Code, GraphError, NodeExecutionError, ValidationError
from graphflow.events import CancelToken, EventHandler, NodeCached, NodeFailed, NodeFinished, NodeStarted, RunStarted
from graphflow.models.manager import ModelManager, shared_manager
from graphflow.paths import PathError, PathPolicy
from graphflow.planning import Plan, plan_execution
from graphflow.registry import NodeRegistry, default_registry
from graphflow.validation import compile_document


@dataclass
class RunResult:
    """What a run produced: named outputs, which nodes ran or came from cache, timings, files.

    Output values are the cached objects themselves, not copies: treat them as read-only
    (`tensor.clone()` before changing one in place), or later runs would see the change.
    """

    outputs: dict[str, Any]
    ran: list[str]
    cached: list[str]
    timings: dict[str, float]
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


_COMPILED_GRAPHS_KEPT = 32


@dataclass
class _PlanMemo:
    plan: Plan
    file_inputs: list[tuple[str, str, bool]]  # (node, input, is a model source)
    digests: dict[tuple[str, str], str] = field(default_factory=dict)
    keys: dict[str, str] | None = None


class Engine:
    """Runs graphs; holds the node registry, the result caches and the path policy.

    `disk_cache` (a directory or a DiskCache) keeps the results of node types that opt in
    (`disk_cache = True`) across processes. `models` is the ModelManager its nodes load models
    through; by default the process-wide one, so every Engine in a process shares loaded models.
    """

    def __init__(self, registry: NodeRegistry | None = None, *, plugins: tuple[str, ...] = (),
                 cache_bytes: int = 2 << 30, input_dirs: list[str | Path] | None = None,
                 output_dir: str | Path | None = None, options: Mapping[str, Any] | None = None,
                 disk_cache: DiskCache | str | Path | None = None, models: ModelManager | None = None) -> None:
        self.registry = registry if registry is not None else default_registry(plugins)
        self.cache = MemoryCache(cache_bytes)
        self.disk_cache = disk_cache if disk_cache is None or isinstance(disk_cache, DiskCache) \
            else DiskCache(disk_cache)
        self.paths = PathPolicy.create(input_dirs, output_dir)
        self.options = dict(options or {})
        self.models = models if models is not None else shared_manager()
        self._instances: dict[type, Any] = {}
        self._compiled: OrderedDict[tuple[str, str | None, Path], CompiledGraph] = OrderedDict()

    def compile(self, graph: Any, params: Mapping[str, Any] | None = None) -> CompiledGraph:
        """Validate a graph (path, document dict, builder Graph) with param values; raise on problems.

        Compiled graphs are remembered by document text, params and template contents, so running
        the same document again skips validation.
        """
        if isinstance(graph, CompiledGraph):
            return graph
        if isinstance(graph, (str, Path)):
            base_dir = Path(graph).resolve().parent
            text = read_document_text(graph)
        else:
            base_dir = Path.cwd().resolve()  # where templates named by a dict document resolve
            graph_document = graph if isinstance(graph, dict) else graph.to_document()
            try:
                text = json.dumps(graph_document, ensure_ascii=False)
            except (TypeError, ValueError):
                return compile_document(graph_document, self.registry, params, base_dir=base_dir,
                                        roots=self.paths.input_roots)
        try:
            params_text = json.dumps(dict(params or {}), sort_keys=True)
        except (TypeError, ValueError):
            params_text = None
        memo_key = (text, params_text, base_dir)
        compiled = self._compiled.get(memo_key) if params_text is not None else None
        if compiled is not None and all(path.is_file() and file_digest(path.read_bytes()) == digest
                                        for path, digest in compiled.template_files.items()):
            self._compiled.move_to_end(memo_key)
            return compiled
        document = parse_document(text, str(graph)) if isinstance(graph, (str, Path)) else graph_document
        compiled = compile_document(document, self.registry, params, base_dir=base_dir, roots=self.paths.input_roots)
        if params_text is not None:
            self._compiled[memo_key] = compiled
            if len(self._compiled) > _COMPILED_GRAPHS_KEPT:
                self._compiled.popitem(last=False)
        return compiled

    def run(self, graph: Any, params: Mapping[str, Any] | None = None, *, outputs: list[str] | None = None,
            on_event: EventHandler | None = None, cancel: CancelToken | None = None,
            options: Mapping[str, Any] | None = None) -> RunResult:
        """Run what the requested named `outputs` (default: all, plus every output node) need.

        `options` override the engine's options (e.g. {"device": "cuda", "dtype": "fp16"}) for this run.
        """
        started = time.perf_counter()
        compiled = self.compile(graph, params)
        run_options = {**self.options, **options} if options else self.options
        plan, keys = self._plan(compiled, outputs, run_options)
        live, to_run, cached = self._reuse(compiled, plan.order, plan.targets, keys)
        if on_event is not None:
            on_event(RunStarted(len(to_run), len(cached)))
            for node_id in cached:
                on_event(NodeCached(node_id, compiled.nodes[node_id].node_type.type_name))
        result = RunResult({}, [], cached, {})
        self._run_nodes(compiled, plan, keys, live, to_run, result, on_event, cancel or CancelToken(), run_options)
        result.outputs = {name: live[link.node][link.output] for name, link in compiled.outputs.items()
                          if outputs is None or name in outputs}
        result.seconds = time.perf_counter() - started
        return result

    def _run_nodes(self, graph: CompiledGraph, plan: Plan, keys: dict[str, str], live: dict[str, dict[str, Any]],
                   to_run: list[str], result: RunResult, on_event: EventHandler | None, cancel: CancelToken,
                   options: dict[str, Any]) -> None:
        """Execute `to_run` in order, caching each result and freeing inputs after their last consumer."""
        remaining = {node_id: 0 for node_id in live}
        for node_id in to_run:
            for source in graph.nodes[node_id].sources:
                remaining[source] = remaining.get(source, 0) + 1
        # Identical nodes under different ids share a key: run the first, hand its result to the rest.
        repeated = {key for key, count in Counter(keys[node_id] for node_id in to_run).items() if count > 1}
        shared: dict[str, dict[str, Any]] = {}
        for node_id in to_run:
            cancel.check()
            node = graph.nodes[node_id]
            key = keys[node_id]
            if key in shared:
                live[node_id] = shared[key]
                result.cached.append(node_id)
                if on_event is not None:
                    on_event(NodeCached(node_id, node.node_type.type_name))
            else:
                ctx = RunContext(node_id, node.node_type.type_name, self.paths, cancel, graph.document,
                                 graph.params, options, on_event, result.files, self.models)
                live[node_id], result.timings[node_id] = self._execute(node, ctx, live, on_event)
                result.ran.append(node_id)
                self._store(node, key, live[node_id])
                if key in repeated:
                    shared[key] = live[node_id]
            for source in node.sources:
                remaining[source] -= 1
                if remaining[source] == 0 and source not in plan.targets:
                    del live[source]  # freed after its last consumer; the cache may still hold it

    def _targets(self, graph: CompiledGraph, outputs: list[str] | None) -> list[str]:
        if outputs is None:
            return list(dict.fromkeys([*(link.node for link in graph.outputs.values()), *graph.output_nodes()]))
        unknown = [name for name in outputs if name not in graph.outputs]
        if unknown:
            raise ValidationError([GraphError(Code.UNKNOWN_OUTPUT, f"the graph has no output '{name}'", input=name,
                                              expected=f"one of {', '.join(graph.outputs) or '(none)'}",
                                              found=repr(name)) for name in unknown])
        return list(dict.fromkeys(graph.outputs[name].node for name in outputs))

    def _plan(self, graph: CompiledGraph, outputs: list[str] | None,
              options: dict[str, Any]) -> tuple[Plan, dict[str, str]]:
        """The plan and cache keys for these outputs, remembered until an input file's bytes change."""
        memo_key = ("plan", tuple(outputs) if outputs is not None else None, repr(sorted(options.items())))
        memo: _PlanMemo | None = graph.memo.get(memo_key)
        if memo is None:
            plan = plan_execution(graph, self._targets(graph, outputs))
            self._check_output_paths(graph, plan)
            file_inputs = [(node_id, spec.name, spec.model) for node_id in plan.order
                           for spec in graph.nodes[node_id].node_type.inputs
                           if (spec.file or spec.model) and isinstance(graph.nodes[node_id].inputs.get(spec.name), str)]
            memo = graph.memo[memo_key] = _PlanMemo(plan, file_inputs)
        digests = self._file_digests(graph, memo.file_inputs)
        if memo.keys is None or digests != memo.digests:
            memo.digests, memo.keys = digests, self._keys(graph, memo.plan.order, digests, options)
        return memo.plan, memo.keys

    def _check_output_paths(self, graph: CompiledGraph, plan: Plan) -> None:
        """Refuse, before anything runs, output paths that would leave the output root."""
        errors: list[GraphError] = []
        for node_id in plan.order:
            node = graph.nodes[node_id]
            for spec in node.node_type.inputs:
                if spec.output_path and isinstance(node.inputs.get(spec.name), str):
                    try:
                        self.paths.output_path(node.inputs[spec.name], node=node_id, input=spec.name)
                    except PathError as error:
                        errors.append(error.error)
        if errors:
            raise ValidationError(errors)

    def _file_digests(self, graph: CompiledGraph,
                      file_inputs: list[tuple[str, str, bool]]) -> dict[tuple[str, str], str]:
        """Content digests of every file input and fingerprints of model sources; every unreadable file is
        reported at once, before any node runs (a model that cannot be found is left to its loader to explain)."""
        digests: dict[tuple[str, str], str] = {}
        errors: list[GraphError] = []
        from graphflow.models.sources import fingerprint  # here, not at import: `import graphflow` stays light

        for node_id, name, model in file_inputs:
            value = graph.nodes[node_id].inputs[name]
            if model:
                digests[node_id, name] = f"{value!r}@{fingerprint(value, self.paths)}"
                continue
            try:
                path = self.paths.input_path(value, node=node_id, input=name)
                digests[node_id, name] = file_digest(path.read_bytes())
            except PathError as error:
                errors.append(error.error)
        if errors:
            raise ValidationError(errors)
        return digests

    def _keys(self, graph: CompiledGraph, order: tuple[str, ...], digests: dict[tuple[str, str], str],
              options: dict[str, Any]) -> dict[str, str]:
        files: dict[str, dict[str, str]] = {}
        for (owner, name), digest in digests.items():
            files.setdefault(owner, {})[name] = digest
        keys: dict[str, str] = {}
        for node_id in order:
            keys[node_id] = cache_key(key_parts(graph.nodes[node_id], keys, files.get(node_id, {}), options))
        return keys

    def _reuse(self, graph: CompiledGraph, order: tuple[str, ...], targets: frozenset[str],
               keys: dict[str, str]) -> tuple[dict[str, dict[str, Any]], list[str], list[str]]:
        """Walk back from the targets: a cached node's upstream is not needed at all."""
        needed = set(targets)
        live: dict[str, dict[str, Any]] = {}
        to_run: list[str] = []
        cached: list[str] = []
        for node_id in reversed(order):
            if node_id not in needed:
                continue
            node = graph.nodes[node_id]
            hit = self._lookup(node, keys[node_id])
            if hit is not None:
                live[node_id] = hit  # held here, so later evictions cannot take it from this run
                cached.append(node_id)
            else:
                to_run.append(node_id)
                needed.update(node.sources)
        to_run.reverse()
        cached.reverse()
        return live, to_run, cached

    def _lookup(self, node: CompiledNode, key: str) -> dict[str, Any] | None:
        """A reusable cached result: from memory, else from disk for node types that keep one there."""
        hit = self.cache.get(key)
        if hit is None and node.node_type.disk_cache and self.disk_cache is not None:
            hit = self.disk_cache.get(key)
            if hit is not None:
                self.cache.put(key, hit)
        if hit is not None and self._instance(node.node_type).outputs_still_valid(hit):
            return hit
        return None

    def _store(self, node: CompiledNode, key: str, outputs: dict[str, Any]) -> None:
        self.cache.put(key, outputs)
        if node.node_type.disk_cache and self.disk_cache is not None:
            self.disk_cache.put(key, outputs)

    def _execute(self, node: CompiledNode, ctx: RunContext, live: dict[str, dict[str, Any]],
                 on_event: EventHandler | None) -> tuple[dict[str, Any], float]:
        type_name = node.node_type.type_name
        values = {name: _resolve(value, live) for name, value in node.inputs.items()}
        if on_event is not None:
            on_event(NodeStarted(node.id, type_name))
        started = time.perf_counter()
        try:
            result = self._instance(node.node_type).run(ctx, **values)
            if not isinstance(result, dict) or not result.keys() >= node.node_type.output_map.keys():
                missing = [name for name in node.node_type.output_map if name not in (result or {})]
                raise TypeError(f"{type_name}.run returned no value for outputs {missing}")
        except Cancelled:
            raise
        except Exception as error:
            if on_event is not None:
                on_event(NodeFailed(node.id, type_name, error))
            raise NodeExecutionError(node.id, type_name, error) from error
        seconds = time.perf_counter() - started
        if on_event is not None:
            on_event(NodeFinished(node.id, type_name, seconds))
        return result, seconds

    def _instance(self, node_type: type) -> Any:
        instance = self._instances.get(node_type)
        if instance is None:
            instance = self._instances[node_type] = node_type()
        return instance


def _resolve(value: Any, live: dict[str, dict[str, Any]]) -> Any:
    if isinstance(value, Link):
        return live[value.node][value.output]
    if isinstance(value, list):
        return [_resolve(item, live) for item in value]
    return value
