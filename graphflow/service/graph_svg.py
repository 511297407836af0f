"""A compiled graph drawn as SVG for the web page (graphflow.drawing lays it out): one box per node that runs,
`id="node-ID"`, which the page colours as the node runs, comes from cache or fails."""

from __future__ import annotations

from typing import Any

from graphflow.drawing import compiled_view, svg


def graph_svg(compiled: Any) -> str:
    """The SVG of a CompiledGraph: layers left to right, sources before consumers, links as curves."""
    return svg(compiled_view(compiled), labels=False, width=150)
