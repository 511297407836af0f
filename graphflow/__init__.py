"""graphflow: image-generation workflows as typed, validated, content-cached node graphs."""

from graphflow.builder import Graph
from graphflow.compiled import CompiledGraph, Link
from graphflow.document import dumps, load_document, parse_document, save_document
from graphflow.engine import Engine, RunResult
from graphflow.errors import Cancelled, Code, GraphError, GraphflowError, NodeExecutionError, ValidationError
from graphflow.events import CancelToken
from graphflow.node import Input, Node, Output
from graphflow.registry import NodeRegistry, default_registry

__all__ = [
    "CancelToken", "Cancelled", "Code", "CompiledGraph", "Engine", "Graph", "GraphError", "GraphflowError", "Input",
    "Link", "Node", "NodeExecutionError", "NodeRegistry", "Output", "RunResult", "ValidationError",
    "default_registry", "dumps", "load_document", "parse_document", "save_document",
]
__version__ = "0.1.0"
