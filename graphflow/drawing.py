"""Graphs drawn for people: one layered layout, written as SVG, Graphviz DOT or a Mermaid flowchart.

A `GraphView` is what a drawing shows: boxes (nodes with their type and literal inputs, params, named outputs)
and named links (`source.output -> target.input`). It comes from a document (`graphflow show`: templates stay
one node each, params are boxes of their own) or from a compiled graph (the web page: templates expanded, one
box per node that runs). Every name and value comes from a document, so each format escapes it: XML text and
attributes for SVG, quoted strings for DOT, entity codes for Mermaid. Nothing is evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from typing import Any, Literal

from graphflow.errors import printable

Kind = Literal["node", "param", "output"]
FORMATS = {".svg": "svg", ".dot": "dot", ".gv": "dot", ".mmd": "mmd", ".mermaid": "mmd"}
_VALUE_CHARS = 40  # of one literal shown in a box


@dataclass(frozen=True)
class Box:
    """One box: `id` is unique in its view; `lines` are what it says under its id (type, values)."""

    id: str
    kind: Kind
    lines: tuple[str, ...] = ()


@dataclass(frozen=True)
class Edge:
    """A named link: output `output` of box `source` feeds input `input` of box `target`."""

    source: str
    output: str
    target: str
    input: str

    @property
    def label(self) -> str:
        return f"{self.output} → {self.input}" if self.output else self.input


@dataclass(frozen=True)
class GraphView:
    name: str
    boxes: tuple[Box, ...]
    edges: tuple[Edge, ...]


def document_view(document: dict[str, Any], types: dict[str, str]) -> GraphView:
    """The view of a document that validates: its nodes (`types` gives each node's type as shown, e.g.
    "template parts/render.json"), literal inputs as lines, params and named outputs as boxes of their own."""
    boxes: list[Box] = []
    edges: list[Edge] = []
    for name, declaration in document.get("params", {}).items():
        boxes.append(Box(f"param:{name}", "param", (_param_line(declaration),)))
    for node_id, entry in document["nodes"].items():
        lines = [types[node_id]]
        for input, value in entry.get("inputs", {}).items():
            literals = [item for item in (value if isinstance(value, list) else [value]) if not isinstance(item, dict)]
            if literals:
                shown = literals[0] if not isinstance(value, list) else literals
                lines.append(f"{input} = {_short(json.dumps(shown, ensure_ascii=False))}")
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict) and "from" in item:
                    source, _, output = str(item["from"]).partition(".")
                    edges.append(Edge(source, output, node_id, input))
                elif isinstance(item, dict) and "param" in item:
                    edges.append(Edge(f"param:{item['param']}", "", node_id, input))
        boxes.append(Box(node_id, "node", tuple(lines)))
    for name, target in document.get("outputs", {}).items():
        source, _, output = target.partition(".")
        boxes.append(Box(f"output:{name}", "output", ("graph output",)))
        edges.append(Edge(source, output, f"output:{name}", name))
    return GraphView(str(document.get("name", "")), tuple(boxes), tuple(edges))


def compiled_view(compiled: Any) -> GraphView:
    """The view of a CompiledGraph: one box per node that runs (templates expanded), links between them."""
    from graphflow.compiled import links_in

    edges = [Edge(link.node, link.output, node.id, name) for node in compiled.nodes.values()
             for name, value in node.inputs.items() for link in links_in(value)]
    boxes = [Box(node.id, "node", (node.node_type.type_name,)) for node in compiled.nodes.values()]
    return GraphView("", tuple(boxes), tuple(edges))


def _param_line(declaration: dict[str, Any]) -> str:
    kind = f"list of {declaration['type']}" if declaration.get("list") else str(declaration["type"])
    if "default" in declaration:
        return f"{kind} = {_short(json.dumps(declaration['default'], ensure_ascii=False))}"
    return f"{kind}, required"


def _short(text: str) -> str:
    return text if len(text) <= _VALUE_CHARS else text[:_VALUE_CHARS - 1] + "…"


def layers(view: GraphView) -> list[list[str]]:
    """The box ids in columns: sources before their consumers (networkx's topological generations), each column
    in the view's order."""
    import networkx as nx

    graph = nx.DiGraph()
    graph.add_nodes_from(box.id for box in view.boxes)
    graph.add_edges_from((edge.source, edge.target) for edge in view.edges)
    order = {box.id: index for index, box in enumerate(view.boxes)}
    return [sorted(layer, key=order.__getitem__) for layer in nx.topological_generations(graph)]


_WIDTH, _LINE, _PAD, _GAP_Y, _MARGIN, _PORT = 170, 14, 8, 18, 10, 12
_FILL = {"node": "#f4f6fb", "param": "#fff7e0", "output": "#e8f5e9"}


def svg(view: GraphView, *, labels: bool = True, width: int = _WIDTH) -> str:
    """The view as an SVG document: columns left to right, one box per node (`id="node-ID"`, which the web page
    colours as the node runs), links as curves, with their names when `labels`."""
    gap_x = 150 if labels else 60
    boxes = {box.id: box for box in view.boxes}
    incoming: dict[str, list[Edge]] = {box.id: [] for box in view.boxes}
    for edge in view.edges:
        incoming[edge.target].append(edge)
    # tall enough for its lines and for one arrival point (and label) per incoming link
    heights = {box.id: max(_PAD * 2 + _LINE * (1 + len(box.lines)), _PORT * (len(incoming[box.id]) + 1) if labels
                           else 0) for box in view.boxes}
    place: dict[str, tuple[int, int]] = {}
    columns = layers(view)
    for column, layer in enumerate(columns):
        y = _MARGIN
        for box_id in layer:
            place[box_id] = (_MARGIN + column * (width + gap_x), y)
            y += heights[box_id] + _GAP_Y
    total_width = max(_MARGIN * 2 + len(columns) * (width + gap_x) - gap_x, 0)
    total_height = max((y + heights[box_id] + _MARGIN for box_id, (_, y) in place.items()), default=0)
    # drawn at its own size where it fits, scaled down (whole, proportions kept) to a narrower container
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" width="{total_width}" height="{total_height}" '
             f'viewBox="0 0 {total_width} {total_height}" preserveAspectRatio="xMinYMin meet" '
             f'style="max-width:100%;height:auto" font-family="sans-serif" font-size="11">']
    if view.name:
        parts.append(f"<title>{_xml(view.name)}</title>")
    arrival = {}  # each link arrives at a point of its own on its target's left side, in the order of its source
    for target, edges in incoming.items():
        edges.sort(key=lambda edge: place[edge.source][1])
        for index, edge in enumerate(edges):
            arrival[id(edge)] = place[target][1] + heights[target] * (index + 1) / (len(edges) + 1)
    for edge in view.edges:
        (x1, y1), (x2, _) = place[edge.source], place[edge.target]
        x1, y1, y2 = x1 + width, y1 + heights[edge.source] / 2, arrival[id(edge)]
        middle = (x1 + x2) / 2
        dashed = ' stroke-dasharray="4 3"' if boxes[edge.source].kind == "param" else ""
        parts.append(f'<path d="M{x1},{y1} C{middle},{y1} {middle},{y2} {x2},{y2}" fill="none" stroke="#999"{dashed}>'
                     f"<title>{_xml(f'{edge.source}.{edge.output} → {edge.target}.{edge.input}')}</title></path>")
        if labels:
            parts.append(f'<text x="{x2 - 4}" y="{y2 - 3}" text-anchor="end" font-size="9" fill="#666">'
                         f"{_xml(_fit(edge.label, gap_x - 8))}</text>")
    for box_id, (x, y) in place.items():
        box = boxes[box_id]
        texts = [f'<text x="{x + 8}" y="{y + _PAD + 10}" font-weight="bold">{_xml(_fit(box_id, width))}</text>']
        texts.extend(f'<text x="{x + 8}" y="{y + _PAD + 10 + _LINE * (row + 1)}">{_xml(_fit(line, width))}</text>'
                     for row, line in enumerate(box.lines))
        parts.append(f'<g class="node {box.kind}" id="node-{_xml(box_id)}" data-node="{_xml(box_id)}">'
                     f'<rect x="{x}" y="{y}" width="{width}" height="{heights[box_id]}" rx="5" '
                     f'fill="{_FILL[box.kind]}" stroke="#889"/>{"".join(texts)}</g>')
    parts.append("</svg>")
    return "".join(parts)


def _xml(text: str) -> str:
    """Text for XML content and attributes: markup escaped, and control characters (which XML 1.0 cannot hold at
    all) shown as escapes."""
    return escape(printable(text, limit=None))


def _fit(text: str, pixels: int) -> str:
    """`text` shortened to about what `pixels` hold at the 11 px font (6 px a character)."""
    room = max(pixels // 6 - 1, 4)
    return text if len(text) <= room else text[:room - 1] + "…"


def dot(view: GraphView) -> str:
    """The view as a Graphviz DOT digraph; every id and label a quoted, escaped string."""
    shapes = {"node": 'shape=box, style="rounded,filled", fillcolor="#f4f6fb"',
              "param": 'shape=ellipse, style=filled, fillcolor="#fff7e0"',
              "output": 'shape=box, style="filled", fillcolor="#e8f5e9"'}

    def box_line(box: Box) -> str:
        label = "\\n".join(_dot_text(part) for part in (box.id, *box.lines))
        return f'  {_dot(box.id)} [label="{label}", {shapes[box.kind]}];'

    def edge_line(edge: Edge, from_param: bool) -> str:
        style = ", style=dashed" if from_param else ""
        return f'  {_dot(edge.source)} -> {_dot(edge.target)} [label="{_dot_text(edge.label)}"{style}];'

    head = [f"digraph {_dot(view.name or 'graph')} {{", "  rankdir=LR;", '  node [fontname="sans-serif"];',
            '  edge [fontname="sans-serif", fontsize=9];']
    return _listing(view, head, box_line, edge_line, ["}"])


def _dot(text: str) -> str:
    return f'"{_dot_text(text)}"'


def _dot_text(text: str) -> str:
    """Text inside a DOT quoted string: control characters as visible escapes, then backslashes and quotes
    escaped, so neither ends the string nor becomes a label escape such as \\N or \\l."""
    return printable(text, limit=None).replace("\\", "\\\\").replace('"', '\\"')


def mermaid(view: GraphView) -> str:
    """The view as a Mermaid flowchart: boxes get ids n0, n1, ... (a document's names could be Mermaid keywords),
    labels are quoted with every character outside a plain set written as an entity code."""
    ids = {box.id: f"n{index}" for index, box in enumerate(view.boxes)}
    shapes = {"node": ('["', '"]'), "param": ('(["', '"])'), "output": ('[["', '"]]')}

    def box_line(box: Box) -> str:
        opening, closing = shapes[box.kind]
        return f"  {ids[box.id]}{opening}{'<br>'.join(_mermaid_text(part) for part in (box.id, *box.lines))}{closing}"

    def edge_line(edge: Edge, from_param: bool) -> str:
        arrow = "-.->" if from_param else "-->"
        return f'  {ids[edge.source]} {arrow}|"{_mermaid_text(edge.label)}"| {ids[edge.target]}'

    return _listing(view, ["flowchart LR"], box_line, edge_line, [])


def _listing(view: GraphView, head: list[str], box_line: Callable[[Box], str],
             edge_line: Callable[[Edge, bool], str], tail: list[str]) -> str:
    """A text format's lines: `head`, one per box, one per link (told whether it comes from a param), `tail`."""
    kinds = {box.id: box.kind for box in view.boxes}
    links = [edge_line(edge, kinds[edge.source] == "param") for edge in view.edges]
    return "\n".join([*head, *map(box_line, view.boxes), *links, *tail]) + "\n"


_MERMAID_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.,:/=+()→…")


def _mermaid_text(text: str) -> str:
    return "".join(char if char in _MERMAID_PLAIN else f"#{ord(char)};" for char in text)


def render(view: GraphView, format: str) -> str:
    """The view in `format`: svg, dot or mmd."""
    return {"svg": svg, "dot": dot, "mmd": mermaid}[format](view)
