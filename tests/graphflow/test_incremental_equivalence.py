"""Property: compiling an edit of a document incrementally gives exactly what compiling it afresh gives.

Hypothesis draws small documents of primitive nodes and sequences of edits (values of every JSON type, retyped
nodes, removed nodes and links, reordered nodes, params); after each edit one long-lived Engine (which reuses its
last compile) and a fresh compile must agree on the errors, or on the nodes, order, outputs and cache keys.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphflow import Engine, ValidationError, default_registry
from graphflow.planning import plan_run
from graphflow.validation import compile_document

REGISTRY = default_registry()
IDS = [f"n{index}" for index in range(6)]
SCALARS = st.one_of(st.integers(-3, 3), st.floats(-2, 2, allow_nan=False), st.sampled_from([0.0, -0.0, True, False]),
                    st.sampled_from(["add", "mul", "x", ""]), st.none())


def value_for(draw: st.DrawFn, node_ids: list[str]) -> Any:
    kind = draw(st.sampled_from(["scalar", "link", "param", "list"]))
    if kind == "link" and node_ids:
        source = draw(st.sampled_from(node_ids))
        return {"from": f"{source}.{draw(st.sampled_from(['value', 'result', 'text', 'nope']))}"}
    if kind == "param":
        return {"param": draw(st.sampled_from(["p", "q", "missing"]))}
    if kind == "list":
        return [draw(SCALARS)]
    return draw(SCALARS)


@st.composite
def entries(draw: st.DrawFn, node_id: str, node_ids: list[str]) -> dict[str, Any]:
    node_type = draw(st.sampled_from(["Int", "Float", "String", "Math", "JoinText", "Bool"]))
    names = {"Int": ["value"], "Float": ["value"], "String": ["value"], "Bool": ["value"],
             "Math": ["a", "b", "op"], "JoinText": ["texts", "separator"]}[node_type]
    chosen = draw(st.lists(st.sampled_from(names), unique=True))
    return {"type": node_type, "inputs": {name: value_for(draw, [n for n in node_ids if n != node_id])
                                          for name in chosen}}


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    ids = draw(st.lists(st.sampled_from(IDS), min_size=1, max_size=5, unique=True))
    nodes = {node_id: draw(entries(node_id, ids)) for node_id in ids}
    outputs = {f"o{index}": f"{node_id}.{draw(st.sampled_from(['value', 'result', 'text']))}"
               for index, node_id in enumerate(draw(st.lists(st.sampled_from(ids), max_size=3, unique=True)))}
    params = {"p": {"type": draw(st.sampled_from(["INT", "FLOAT", "STRING"])), "default": 1}}
    return {"graphflow": 1, "name": "g", "params": params, "nodes": nodes, "outputs": outputs}


@st.composite
def edits(draw: st.DrawFn, document: dict[str, Any]) -> dict[str, Any]:
    edited = copy.deepcopy(document)
    nodes = edited["nodes"]
    action = draw(st.sampled_from(["value", "retype", "remove", "add", "reorder", "param", "output"]))
    ids = list(nodes)
    target = draw(st.sampled_from(ids))
    if action == "value" and nodes[target]["inputs"]:
        name = draw(st.sampled_from(list(nodes[target]["inputs"])))
        nodes[target]["inputs"][name] = value_for(draw, [n for n in ids if n != target])
    elif action == "retype":
        nodes[target] = draw(entries(target, ids))
    elif action == "remove" and len(ids) > 1:
        del nodes[target]
    elif action == "add":
        new = draw(st.sampled_from(IDS))
        nodes[new] = draw(entries(new, ids))
    elif action == "reorder":
        edited["nodes"] = dict(reversed(list(nodes.items())))
    elif action == "param":
        edited["params"]["p"] = {"type": draw(st.sampled_from(["INT", "FLOAT"])), "default": draw(SCALARS)}
    else:
        edited["outputs"] = {"o": f"{target}.{draw(st.sampled_from(['value', 'result', 'text']))}"}
    return edited


def outcome(compile_it: Any) -> Any:
    """What a compile gives, comparably: the errors, or the graph's nodes, order, outputs and keys."""
    try:
        graph = compile_it()
    except ValidationError as error:
        return ("errors", [(str(e.code), e.node, e.input, e.message) for e in error.errors])
    nodes = {node_id: (node.node_type.type_name, repr(node.inputs), node.sources)
             for node_id, node in graph.nodes.items()}
    try:
        targets = list(dict.fromkeys(link.node for link in graph.outputs.values()))
        keys = plan_run(graph, targets, {}, Engine(REGISTRY).paths).keys
    except ValidationError as error:
        keys = [str(e.code) for e in error.errors]
    return ("graph", nodes, graph.order, {name: str(link) for name, link in graph.outputs.items()}, keys,
            graph.document)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_an_incremental_compile_equals_a_fresh_one(data: st.DataObject) -> None:
    engine = Engine(REGISTRY, input_dirs=[Path.cwd()])
    document = data.draw(documents())
    values = {}
    for _ in range(4):
        if data.draw(st.booleans()):
            values = {"p": data.draw(SCALARS)}
        fresh = outcome(partial(compile_document, copy.deepcopy(document), REGISTRY, values, base_dir=Path.cwd(),
                                roots=engine.paths.input_roots))
        again = outcome(partial(engine.compile, document, values))
        assert again == fresh
        document = data.draw(edits(document))
