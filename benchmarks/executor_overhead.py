"""Executor overhead per node: trivial nodes (Int, Math) in chain, tree and star shapes.

For each shape and N in 100, 1,000, 10,000 it measures, on one Engine:
  cold     - empty cache: validate, plan, key and run every node;
  cached   - the identical document again (a fresh copy of the dict): nothing runs;
  changed  - one leaf literal changed (a fresh copy): only that leaf's descendants, the cone, run.
It prints microseconds per graph node, the size of the cone, `beyond` - what the changed run
spent per node outside the cone once the cone's nodes are charged at the cold rate - and the
1,000 -> 10,000 scaling ratio of per-node cost (1.0 = perfectly linear). Targets at N = 1,000:
cold <= 20 us/node, cached <= 5 us/node, beyond <= 2 us/node (a change costs only its cone).

Absolute microseconds move with the machine's load, so each row also times, in the same loop, a
minimal interpreter of the same document (no validation, no cache, no events): the `ref`
column, and `cold/ref` is graphflow's full cost as a multiple of that floor.

    python benchmarks/executor_overhead.py [--repeat 5] [--sizes 100 1000 10000]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from typing import Any

from graphflow import Engine, default_registry


def chain(n: int) -> tuple[dict[str, Any], str]:
    """n0 -> n1 -> ... -> n(N-1); the leaf is n0."""
    nodes: dict[str, Any] = {"n0": {"type": "Int", "inputs": {"value": 1}}}
    for i in range(1, n):
        source = f"n{i - 1}.value" if i == 1 else f"n{i - 1}.result"
        nodes[f"n{i}"] = {"type": "Math", "inputs": {"a": {"from": source}, "b": 1.0, "op": "add"}}
    return _document(nodes, {"result": f"n{n - 1}.result" if n > 1 else "n0.value"}), "n0"


def tree(n: int) -> tuple[dict[str, Any], str]:
    """A binary reduction tree: node i adds nodes 2i+1 and 2i+2; leaves are Int nodes.

    Written root first (consumers before sources), so this shape also measures the full
    networkx topological sort that the other shapes, written sources first, skip.
    """
    nodes: dict[str, Any] = {}
    for i in range(n):
        left, right = 2 * i + 1, 2 * i + 2
        if left >= n:
            nodes[f"n{i}"] = {"type": "Int", "inputs": {"value": i}}
            continue
        a = {"from": f"n{left}.{'value' if 2 * left + 1 >= n else 'result'}"}
        b = {"from": f"n{right}.{'value' if 2 * right + 1 >= n else 'result'}"} if right < n else 0.0
        nodes[f"n{i}"] = {"type": "Math", "inputs": {"a": a, "b": b, "op": "add"}}
    return _document(nodes, {"result": "n0.result"}), f"n{n - 1}"


def star(n: int) -> tuple[dict[str, Any], str]:
    """One hub feeding N-1 spokes, every spoke a named output; the leaf changed is one spoke."""
    nodes: dict[str, Any] = {"hub": {"type": "Int", "inputs": {"value": 1}}}
    for i in range(1, n):
        nodes[f"s{i}"] = {"type": "Math", "inputs": {"a": {"from": "hub.value"}, "b": float(i), "op": "mul"}}
    return _document(nodes, {f"r{i}": f"s{i}.result" for i in range(1, n)}), f"s{n - 1}"


def _document(nodes: dict[str, Any], outputs: dict[str, str]) -> dict[str, Any]:
    return {"graphflow": 1, "name": "bench", "nodes": nodes, "outputs": outputs}


def _change_leaf(document: dict[str, Any], leaf: str) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    inputs = changed["nodes"][leaf]["inputs"]
    if "value" in inputs:
        inputs["value"] += 1000
    else:
        inputs["b"] += 1000.0
    return changed


_REFERENCE_OPS = {"add": lambda a, b: a + b, "mul": lambda a, b: a * b}


def reference_run(document: dict[str, Any]) -> dict[str, Any]:
    """The floor: evaluate Int/Math nodes in dependency order with a memo, nothing else."""
    nodes, values = document["nodes"], {}
    stack = [target.split(".")[0] for target in document["outputs"].values()]
    while stack:
        node_id = stack[-1]
        inputs = nodes[node_id]["inputs"]
        pending = [v["from"].split(".")[0] for v in inputs.values() if isinstance(v, dict)
                   and v["from"].split(".")[0] not in values]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        args = {k: values[v["from"].split(".")[0]] if isinstance(v, dict) else v for k, v in inputs.items()}
        values[node_id] = args["value"] if "value" in args else _REFERENCE_OPS[args["op"]](args["a"], args["b"])
    return {name: values[target.split(".")[0]] for name, target in document["outputs"].items()}


def measure(build: Callable[[int], tuple[dict[str, Any], str]], n: int, repeat: int) -> dict[str, float]:
    """Best-of-`repeat` microseconds per node for the cold, cached and one-leaf-changed runs, and the reference.

    The best rather than the median: other load on the machine only ever adds time.
    """
    registry = default_registry()
    document, leaf = build(n)
    changed = _change_leaf(document, leaf)
    samples: dict[str, list[float]] = {"cold": [], "cached": [], "changed": [], "ref": []}
    cone = 0
    for _ in range(repeat):
        engine = Engine(registry)
        # copies, as a script that builds its dict anew each time would pass: nothing may rest on identity
        for label, run, doc in (("cold", engine.run, document), ("cached", engine.run, copy.deepcopy(document)),
                                ("changed", engine.run, copy.deepcopy(changed)), ("ref", reference_run, document)):
            started = time.perf_counter()
            result = run(doc)
            samples[label].append((time.perf_counter() - started) / n * 1e6)
            if label == "changed":
                cone = len(result.ran)
    assert reference_run(document) == engine.run(document).outputs, "the reference must compute the same"
    best = {label: min(values) for label, values in samples.items()}
    best["cone"] = cone
    best["beyond"] = (best["changed"] * n - cone * best["cold"]) / (n - cone) if n > cone else float("nan")
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}; best of {args.repeat}; microseconds per graph node")
    print(f"{'shape':<6} {'N':>6} {'cold':>8} {'cached':>8} {'changed':>8} {'cone':>6} {'beyond':>7} {'ref':>6} "
          f"{'cold/ref':>8}")
    per_shape: dict[str, dict[int, dict[str, float]]] = {}
    for name, build in (("chain", chain), ("tree", tree), ("star", star)):
        for n in args.sizes:
            result = measure(build, n, args.repeat)
            per_shape.setdefault(name, {})[n] = result
            print(f"{name:<6} {n:>6} {result['cold']:>8.2f} {result['cached']:>8.2f} {result['changed']:>8.2f} "
                  f"{result['cone']:>6} {result['beyond']:>7.2f} {result['ref']:>6.2f} "
                  f"{result['cold'] / result['ref']:>8.1f}")
    if 1000 in args.sizes and 10000 in args.sizes:
        print("\nscaling 1,000 -> 10,000 (per-node cost ratio; 1.0 = linear; ref shows Python's own drift)")
        for name, results in per_shape.items():
            ratios = "  ".join(f"{label} {results[10000][label] / results[1000][label]:.2f}"
                               for label in ("cold", "cached", "changed", "ref"))
            print(f"{name:<6} {ratios}")


if __name__ == "__main__":
    main()
