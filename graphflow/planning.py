"""Which nodes a run needs, in the graph's deterministic topological order."""

from __future__ import annotations

from dataclasses import dataclass

from graphflow.compiled import CompiledGraph


@dataclass(frozen=True)
class Plan:
    """The nodes the requested targets depend on, sources before consumers."""

    order: tuple[str, ...]
    targets: frozenset[str]


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
