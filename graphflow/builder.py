"""Building graphs in Python: typed handles in, the same JSON document out.

    g = Graph("canny")
    photo = g.add(LoadImage(path="room.png"), "photo")
    edges = g.add(Canny(image=photo.image, low=50))
    g.output("edges", edges.image)
    g.save("canny.json")

Node calls check their arguments at once (unknown input, wrong type, bad value), `add` checks
that every required input is given, and `save` writes what a hand-written file would hold.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from graphflow.compiled import Link
from graphflow.document import dumps, load_document, save_document
from graphflow.errors import Code, GraphError, ValidationError
from graphflow.node import REQUIRED, Input, Node, OutputRef, ParamRef, missing_input_error
from graphflow.registry import NodeRegistry, default_registry
from graphflow.templates import TemplateLoader, TemplateNode, parse_params
from graphflow.validation import NODE_ID, compile_document


class Graph:
    """A graph under construction; nodes keep the order in which they were added."""

    def __init__(self, name: str = "", description: str = "") -> None:
        self.name = name
        self.description = description
        self.params: dict[str, dict[str, Any]] = {}
        self.outputs: dict[str, OutputRef] = {}
        self.extra: dict[str, Any] = {}
        self.pinned_versions: dict[str, str] = {}  # node id -> the node version the document was written for
        self._nodes: dict[str, Node] = {}
        self._ids: dict[int, str] = {}  # id(node object) -> node id
        self._id_counts: dict[str, int] = {}  # automatic ids handed out per stem

    def add(self, node: Node, node_id: str | None = None) -> Node:
        """Add `node` (and any upstream node it links to that is not in the graph yet); returns it."""
        if id(node) in self._ids:
            return node
        for upstream in self._missing_upstream(node):
            self._add_one(upstream, None)
        return self._add_one(node, node_id)

    def _missing_upstream(self, node: Node) -> list[Node]:
        """Nodes `node` links to, directly or not, that are not in the graph yet, sources first."""
        ordered: list[Node] = []
        seen: set[int] = set()
        stack = [(ref.node, False) for value in node.values.values() for ref in _refs(value)]
        while stack:
            current, expanded = stack.pop()
            if id(current) in self._ids or (id(current) in seen and not expanded):
                continue
            if expanded:
                ordered.append(current)
                continue
            seen.add(id(current))
            stack.append((current, True))
            stack.extend((ref.node, False) for value in current.values.values() for ref in _refs(value))
        return ordered

    def _add_one(self, node: Node, node_id: str | None) -> Node:
        node_id = node_id if node_id is not None else self._fresh_id(node.type_name)
        missing = [missing_input_error(type(node), spec, node_id)
                   for spec in node.inputs if spec.required and spec.name not in node.values]
        if missing:
            raise ValidationError(missing)
        if not NODE_ID.fullmatch(node_id) or node_id in self._nodes:
            problem = "is already used" if node_id in self._nodes else "may use letters, digits, '_' and '-' only"
            raise ValidationError([GraphError(Code.INVALID_NODE_ID, f"node id '{node_id}' {problem}", node_id,
                                              expected="a new id matching " + NODE_ID.pattern, found=repr(node_id))])
        self._nodes[node_id] = node
        self._ids[id(node)] = node_id
        return node

    def param(self, name: str, type: str, default: Any = REQUIRED, description: str = "", *,
              min: float | None = None, max: float | None = None, choices: tuple[Any, ...] | None = None,
              list: bool = False) -> ParamRef:
        """Declare a template parameter and return a reference to use as an input value; `list`: a list of
        `type` values (for list inputs)."""
        declaration: dict[str, Any] = {"type": type, **({"list": True} if list else {})}
        if default is not REQUIRED:
            declaration["default"] = default
        if description:
            declaration["description"] = description
        for key, value in (("min", min), ("max", max), ("choices", [*choices] if choices else None)):
            if value is not None:
                declaration[key] = value
        _, errors = parse_params({"params": {name: declaration}})
        if errors:
            raise ValidationError(errors)
        self.params[name] = declaration
        return ParamRef(name, type, list)

    def output(self, name: str, ref: OutputRef) -> None:
        """Name a result of the graph."""
        if id(ref.node) not in self._ids:
            self.add(ref.node)
        self.outputs[name] = ref

    def __getitem__(self, node_id: str) -> Node:
        return self._nodes[node_id]

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def id_of(self, node: Node) -> str:
        return self._ids[id(node)]

    def to_document(self, base_dir: Path | None = None) -> dict[str, Any]:
        """The graph as a document; template paths are written relative to `base_dir` (default: cwd)."""
        base = (base_dir or Path.cwd()).resolve()
        document: dict[str, Any] = {**self.extra, "graphflow": 1}
        if self.name:
            document["name"] = self.name
        if self.description:
            document["description"] = self.description
        if self.params:
            document["params"] = self.params
        document["nodes"] = {node_id: self._entry(node_id, node, base) for node_id, node in self._nodes.items()}
        document["outputs"] = {name: f"{self.id_of(ref.node)}.{ref.name}" for name, ref in self.outputs.items()}
        return document

    def dumps(self) -> str:
        return dumps(self.to_document())

    def save(self, path: str | Path) -> None:
        """Write the canonical document, the same bytes as the equivalent hand-written file."""
        path = Path(path)
        save_document(self.to_document(path.resolve().parent), path)

    @classmethod
    def load(cls, path: str | Path, registry: NodeRegistry | None = None) -> Graph:
        """Load a document file to extend it in Python."""
        path = Path(path)
        return cls.from_document(load_document(path), registry, base_dir=path.resolve().parent)

    @classmethod
    def from_document(cls, document: dict[str, Any], registry: NodeRegistry | None = None, *,
                      base_dir: Path | None = None) -> Graph:
        """A builder Graph holding the document's nodes, params and outputs (validated first)."""
        registry = registry if registry is not None else default_registry()
        base = (base_dir or Path.cwd()).resolve()
        loader = TemplateLoader(registry, (base,))  # shared with validation, so templates load once
        compiled = compile_document(document, registry, base_dir=base, as_template=True, loader=loader)
        graph = cls(document.get("name", ""), document.get("description", ""))
        graph.extra = {"$schema": document["$schema"]} if "$schema" in document else {}  # validation allows no other
        graph.params = dict(document.get("params", {}))
        param_specs = parse_params(document)[0]
        entries = document["nodes"]
        # Links need their source built first; the document's own order is restored afterwards.
        for node_id in dict.fromkeys(compiled_id.split("/")[0] for compiled_id in compiled.order):
            entry = entries[node_id]
            node_type = registry.get(entry["type"]) if "type" in entry else \
                loader.node_class(loader.resolve(entry["template"], base, node_id), (), node_id)
            values = {name: _builder_value(value, graph, param_specs)
                      for name, value in entry.get("inputs", {}).items()}
            graph.add(node_type(**values), node_id)
            if "version" in entry:
                graph.pinned_versions[node_id] = str(entry["version"])
        graph._nodes = {node_id: graph._nodes[node_id] for node_id in entries}
        for name, target in document.get("outputs", {}).items():
            link = Link.parse(target)
            graph.outputs[name] = graph[link.node][link.output]
        return graph

    def _entry(self, node_id: str, node: Node, base: Path) -> dict[str, Any]:
        if isinstance(node, TemplateNode):
            entry = {"template": Path(os.path.relpath(node.template_path, base)).as_posix()}
        else:
            entry = {"type": node.type_name}
        if node_id in self.pinned_versions:
            entry["version"] = self.pinned_versions[node_id]
        return entry | {"inputs": {name: self._document_value(value) for name, value in node.values.items()}}

    def _document_value(self, value: Any) -> Any:
        if isinstance(value, OutputRef):
            return {"from": f"{self.id_of(value.node)}.{value.name}"}
        if isinstance(value, ParamRef):
            return {"param": value.name}
        if isinstance(value, (list, tuple)):
            return [self._document_value(item) for item in value]
        return value

    def _fresh_id(self, type_name: str) -> str:
        stem = re.sub(r"(?<!^)(?=[A-Z])", "_", type_name.split(":")[-1].split(".")[0]).lower()
        stem = re.sub(r"[^a-z0-9_\-]", "_", stem)
        count = self._id_counts.get(stem, 0)
        candidate = stem if count == 0 else f"{stem}_{count + 1}"
        while candidate in self._nodes:
            count += 1
            candidate = f"{stem}_{count + 1}"
        self._id_counts[stem] = count + 1
        return candidate


def _refs(value: Any) -> list[OutputRef]:
    if isinstance(value, OutputRef):
        return [value]
    if isinstance(value, (list, tuple)):
        return [item for item in value if isinstance(item, OutputRef)]
    return []


def _builder_value(value: Any, graph: Graph, params: dict[str, Input]) -> Any:
    if isinstance(value, list):
        return [_builder_value(item, graph, params) for item in value]
    if isinstance(value, dict) and "from" in value:
        link = Link.parse(value["from"])
        return graph[link.node][link.output]
    if isinstance(value, dict) and "param" in value:
        spec = params.get(value["param"])
        return ParamRef(value["param"], spec.type, spec.list) if spec is not None else ParamRef(value["param"])
    return value

