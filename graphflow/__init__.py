"""graphflow: image-generation workflows as typed, validated, content-cached node graphs.

The names below load on first use: `import graphflow` (or any of its modules, such as the command
line's) imports nothing else, so it stays quick and a Ctrl-C while it starts can still be handled.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphflow.batches import Batch, expand
    from graphflow.builder import Graph
    from graphflow.compiled import CompiledGraph, Link
    from graphflow.document import dumps, load_document, parse_document, save_document
    from graphflow.engine import Engine, RunResult
    from graphflow.errors import Cancelled, Code, GraphError, GraphflowError, NodeExecutionError, ValidationError
    from graphflow.events import CancelToken
    from graphflow.node import Input, Node, Output
    from graphflow.registry import NodeRegistry, default_registry
    from graphflow.rerun import RerunWarning, rerun_png

_HOMES = {
    "Batch": "batches", "expand": "batches",
    "Graph": "builder", "CompiledGraph": "compiled", "Link": "compiled", "dumps": "document",
    "load_document": "document", "parse_document": "document", "save_document": "document", "Engine": "engine",
    "RunResult": "engine", "Cancelled": "errors", "Code": "errors", "GraphError": "errors",
    "GraphflowError": "errors", "NodeExecutionError": "errors", "ValidationError": "errors",
    "CancelToken": "events", "Input": "node", "Node": "node", "Output": "node", "NodeRegistry": "registry",
    "default_registry": "registry", "rerun_png": "rerun", "RerunWarning": "rerun",
}
__all__ = [
    "Batch", "CancelToken", "Cancelled", "Code", "CompiledGraph", "Engine", "Graph", "GraphError", "GraphflowError",
    "Input",
    "Link", "Node", "NodeExecutionError", "NodeRegistry", "Output", "RerunWarning", "RunResult", "ValidationError",
    "default_registry", "dumps", "expand", "load_document", "parse_document", "rerun_png", "save_document",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'graphflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"graphflow.{home}"), name)
    globals()[name] = value  # looked up once
    return value
