"""The executor: validate, plan, look up cached results, run the rest, report what happened.

One Engine serves many runs and keeps its cache between them, from one thread or several at
once. Results already cached are reused without touching their upstream nodes; a failing node
leaves everything before it cached, so the next run resumes there; two runs that need the same
uncached node at the same time compute it once.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphflow.cache import MemoryCache
from graphflow.compiled import CompiledGraph, CompiledNode
from graphflow.disk_cache import DiskCache
from graphflow.document import parse_document, read_document_text
from graphflow.errors import Code, GraphError, ValidationError
from graphflow.events import CancelToken, EventHandler, NodeCached, RunStarted
from graphflow.execution import Run, node_traits
from graphflow.incremental import templates_unchanged
from graphflow.models.manager import ModelManager, shared_manager
from graphflow.node import Node
from graphflow.paths import PathPolicy
from graphflow.planning import KeyedPlan, plan_run
from graphflow.registry import NodeRegistry, default_registry
from graphflow.rerun import is_png, read_png, rerun_options
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


class _Flight:
    """One node result being computed by some run; other runs that need the same key wait for it to land."""

    __slots__ = ("landed", "outputs", "signal")

    def __init__(self) -> None:
        self.landed = False
        self.outputs: dict[str, Any] | None = None  # None when the computing run failed or was cancelled
        self.signal: threading.Event | None = None  # made by the first run that waits: most flights have none


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
        self._lock = threading.Lock()  # guards the memos and instances below, and waiting for flights
        self._instances: dict[type[Node], Node] = {}
        self._compiled: OrderedDict[Any, CompiledGraph] = OrderedDict()  # by document text, params and folder
        self._lineages: OrderedDict[Any, CompiledGraph] = OrderedDict()  # the last compile of each document
        self._flights: dict[str, _Flight] = {}

    def compile(self, graph: Any, params: Mapping[str, Any] | None = None) -> CompiledGraph:
        """Validate a graph (path, document dict, builder Graph, PNG from SaveImage) with param values; raise on
        problems. A PNG brings its recorded params; `params` override them.

        A document file already compiled with these params, and unchanged since, is not validated
        again; an edited document (or the same one with other params) re-validates only the nodes
        that changed, keeping the rest from its last compile (see graphflow.incremental).
        """
        if isinstance(graph, CompiledGraph):
            return graph
        values = dict(params or {})
        if isinstance(graph, (str, Path)):
            if is_png(graph):  # a PNG from SaveImage: its workflow, its params
                workflow = read_png(graph)
                text, values = workflow.text, {**workflow.params, **values}
            else:
                text = read_document_text(graph)  # first: it explains a path that cannot be read (or resolved)
            base_dir = Path(graph).resolve().parent
            memo_key = (text, _params_text(values), base_dir)
            compiled = self._remembered(self._compiled, memo_key)
            if compiled is not None and templates_unchanged(compiled):
                return compiled
            document = parse_document(text, str(graph))
        else:
            base_dir = Path.cwd().resolve()  # where templates named by a dict document resolve
            document = graph if isinstance(graph, dict) else graph.to_document()
            memo_key = None
        name = document.get("name") if isinstance(document, dict) else None
        in_folder = memo_key is not None  # a file's relative paths resolve in its folder; a dict's in the roots
        lineage = (base_dir, in_folder, name if isinstance(name, str) else None)
        previous = self._remembered(self._lineages, lineage)
        compiled = compile_document(document, self.registry, values, base_dir=base_dir,
                                    roots=self.paths.input_roots, previous=previous, in_folder=in_folder)
        self._remember(self._lineages, lineage, compiled)
        if memo_key is not None and memo_key[1] is not None:
            self._remember(self._compiled, memo_key, compiled)
        return compiled

    def _remembered(self, memo: OrderedDict[Any, CompiledGraph], key: Any) -> CompiledGraph | None:
        with self._lock:
            compiled = memo.get(key)
            if compiled is not None:
                memo.move_to_end(key)
            return compiled

    def _remember(self, memo: OrderedDict[Any, CompiledGraph], key: Any, compiled: CompiledGraph) -> None:
        with self._lock:
            memo[key] = compiled
            memo.move_to_end(key)
            if len(memo) > _COMPILED_GRAPHS_KEPT:
                memo.popitem(last=False)

    def run(self, graph: Any, params: Mapping[str, Any] | None = None, *, outputs: list[str] | None = None,
            on_event: EventHandler | None = None, cancel: CancelToken | None = None,
            options: Mapping[str, Any] | None = None) -> RunResult:
        """Run what the requested named `outputs` (default: all, plus every output node) need.

        `options` override the engine's options (e.g. {"device": "cuda", "dtype": "fp16"}) for this run. A PNG that
        SaveImage wrote runs its workflow again (graphflow.rerun): on its recorded device and dtype where the options
        say `auto`, with a RerunWarning for what differs from when it was made.
        """
        started = time.perf_counter()
        compiled = self.compile(graph, params)
        # whether the model manager compiles models is an option too: it is part of the loaders' keys
        run_options = {"compile": self.models.compile, **self.options, **(options or {})}
        if isinstance(graph, (str, Path)) and is_png(graph):
            run_options = rerun_options(read_png(graph), run_options, self.paths)
        keyed = plan_run(compiled, self._targets(compiled, outputs), run_options, self.paths)
        live, to_run, cached = self._reuse(compiled, keyed)
        if on_event is not None:
            on_event(RunStarted(len(to_run), len(cached)))
            for node_id in cached:
                on_event(NodeCached(node_id, compiled.nodes[node_id].node_type.type_name))
        result = RunResult({}, [], cached, {})
        Run(self, compiled, keyed, live, result, on_event, cancel or CancelToken(), run_options).execute(to_run)
        result.outputs = {name: live[link.node][link.output] for name, link in compiled.outputs.items()
                          if outputs is None or name in outputs}
        result.seconds = time.perf_counter() - started
        return result

    def _targets(self, graph: CompiledGraph, outputs: list[str] | None) -> list[str]:
        if outputs is None:
            return list(dict.fromkeys([*(link.node for link in graph.outputs.values()), *graph.output_nodes()]))
        unknown = [name for name in outputs if name not in graph.outputs]
        if unknown:
            raise ValidationError([GraphError(Code.UNKNOWN_OUTPUT, f"the graph has no output '{name}'", input=name,
                                              expected=f"one of {', '.join(graph.outputs) or '(none)'}",
                                              found=repr(name)) for name in unknown])
        return list(dict.fromkeys(graph.outputs[name].node for name in outputs))

    def _reuse(self, graph: CompiledGraph,
               keyed: KeyedPlan) -> tuple[dict[str, dict[str, Any]], list[str], list[str]]:
        """Walk back from the targets: a cached node's upstream is not needed at all."""
        needed = set(keyed.plan.targets)
        live: dict[str, dict[str, Any]] = {}
        to_run: list[str] = []
        cached: list[str] = []
        nodes, keys, remembered = graph.nodes, keyed.keys, self.cache.get
        for node_id in reversed(keyed.plan.order):
            if node_id not in needed:
                continue
            node = nodes[node_id]
            key = keys[node_id]
            hit = remembered(key)  # the common case, in memory and needing no check, without a call more
            if hit is None or node_traits(node.node_type).checks_outputs:
                hit = self._usable(node, key, hit, disk=True)
            if hit is not None:
                live[node_id] = hit  # held here, so later evictions cannot take it from this run
                cached.append(node_id)
            else:
                to_run.append(node_id)
                needed.update(node.sources)
        to_run.reverse()
        cached.reverse()
        return live, to_run, cached

    def lookup(self, node: CompiledNode, key: str, *, disk: bool = True) -> dict[str, Any] | None:
        """A reusable cached result: from memory, else (with `disk`) from disk for node types that keep one there."""
        return self._usable(node, key, self.cache.get(key), disk=disk)

    def _usable(self, node: CompiledNode, key: str, hit: dict[str, Any] | None, *,
                disk: bool) -> dict[str, Any] | None:
        """`hit` (what the memory cache holds for `key`), else what the disk tier holds, if the node may reuse it."""
        node_type = node.node_type
        if hit is None and disk and node_type.disk_cache and self.disk_cache is not None:
            hit = self.disk_cache.get(key)
            if hit is not None:
                self.cache.put(key, hit)
        if hit is None or not node_traits(node_type).checks_outputs:
            return hit
        if self.instance(node_type).outputs_still_valid(hit):
            return hit
        return None

    def store(self, node: CompiledNode, key: str, outputs: dict[str, Any]) -> None:
        self.cache.put(key, outputs)
        if node.node_type.disk_cache and self.disk_cache is not None:
            self.disk_cache.put(key, outputs)

    def instance(self, node_type: type[Node]) -> Node:
        """The one instance of a node type that runs all its nodes (node types keep no state between runs)."""
        instance = self._instances.get(node_type)
        if instance is None:
            with self._lock:
                instance = self._instances.setdefault(node_type, node_type())
        return instance

    # Claiming and landing take no lock: dict.setdefault and dict.pop are atomic, and a waiter that misses the
    # signal still sees `landed` within one wait. Only waiters (rare) lock, to share one Event per flight.

    def claim(self, key: str) -> _Flight | None:
        """None when this run is now the one computing `key`; else the flight of the run already computing it."""
        mine = _Flight()
        flight = self._flights.setdefault(key, mine)
        return None if flight is mine else flight

    def await_landing(self, flight: _Flight, cancel: CancelToken) -> dict[str, Any] | None:
        """Wait until `flight` lands (checking `cancel` meanwhile); its outputs, None if its run failed."""
        with self._lock:
            if flight.signal is None:
                flight.signal = threading.Event()
            signal = flight.signal
        while not flight.landed:
            signal.wait(0.05)
            cancel.check()
        return flight.outputs

    def land(self, key: str, outputs: dict[str, Any] | None) -> None:
        """End this run's flight for `key`, handing `outputs` (None: it failed) to the runs waiting for it."""
        flight = self._flights.pop(key)
        flight.outputs = outputs
        flight.landed = True
        if flight.signal is not None:
            flight.signal.set()


def _params_text(values: dict[str, Any]) -> str | None:
    try:
        return json.dumps(values, sort_keys=True)
    except (TypeError, ValueError, RecursionError):  # not JSON data: such a compile is not remembered by text
        return None
