"""A compiled graph drawn as SVG, laid out server-side in layers (networkx's topological generations): one box per
node, `id="node-ID"`, that the web page colours as the node runs, comes from cache or fails."""

from __future__ import annotations

from html import escape
from typing import Any

_WIDTH, _HEIGHT, _GAP_X, _GAP_Y, _MARGIN = 150, 40, 60, 18, 10


def graph_svg(compiled: Any) -> str:
    """The SVG of a CompiledGraph: layers left to right, sources before consumers, edges as curves."""
    import networkx as nx

    graph = nx.DiGraph()
    graph.add_nodes_from(compiled.nodes)
    graph.add_edges_from((source, node.id) for node in compiled.nodes.values() for source in node.sources)
    layers = list(nx.topological_generations(graph))
    place = {node: (_MARGIN + column * (_WIDTH + _GAP_X), _MARGIN + row * (_HEIGHT + _GAP_Y))
             for column, layer in enumerate(layers) for row, node in enumerate(sorted(layer))}
    width = _MARGIN * 2 + len(layers) * (_WIDTH + _GAP_X) - _GAP_X
    height = _MARGIN * 2 + max((len(layer) for layer in layers), default=0) * (_HEIGHT + _GAP_Y) - _GAP_Y
    # drawn at its own size where it fits, scaled down (whole, proportions kept) to a narrower container
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" width="{width}" height="{max(height, 0)}" '
             f'viewBox="0 0 {width} {max(height, 0)}" preserveAspectRatio="xMinYMin meet" '
             f'style="max-width:100%;height:auto" font-family="sans-serif" font-size="11">']
    for source, target in graph.edges:
        (x1, y1), (x2, y2) = place[source], place[target]
        x1, y1, y2 = x1 + _WIDTH, y1 + _HEIGHT / 2, y2 + _HEIGHT / 2
        middle = (x1 + x2) / 2
        parts.append(f'<path d="M{x1},{y1} C{middle},{y1} {middle},{y2} {x2},{y2}" fill="none" stroke="#999"/>')
    for node_id, (x, y) in place.items():
        kind = compiled.nodes[node_id].node_type.type_name
        parts.append(f'<g class="node" id="node-{escape(node_id)}" data-node="{escape(node_id)}">'
                     f'<rect x="{x}" y="{y}" width="{_WIDTH}" height="{_HEIGHT}" rx="5"/>'
                     f'<text x="{x + 8}" y="{y + 16}" font-weight="bold">{escape(_short(node_id))}</text>'
                     f'<text x="{x + 8}" y="{y + 31}">{escape(_short(kind))}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _short(text: str) -> str:
    return text if len(text) <= 22 else text[:21] + "…"
