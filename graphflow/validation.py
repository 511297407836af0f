"""Validation: turn a document into a CompiledGraph, collecting every problem before raising.

One pass checks structure, node types, inputs, links, types, values, params and cycles, and
builds the executable graph at the same time, so what validates is exactly what runs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphflow import types
from graphflow.compiled import CompiledGraph, CompiledNode, Link, links_in
from graphflow.document import NAME_PATTERN, migrate, private_document, shape_errors
from graphflow.errors import Code, GraphError, ValidationError, did_you_mean
from graphflow.incremental import Reuse
from graphflow.node import REQUIRED, Input, Node, file_link_error, missing_input_error, unknown_input_error
from graphflow.planning import inherit_plans
from graphflow.registry import NodeRegistry
from graphflow.templates import (
    TemplateLoader,
    TemplateNode,
    inside_template,
    param_value_errors,
    parse_params,
    unknown_param_error,
)


@dataclass(frozen=True)
class Unbound:
    """A param with no value: an error when running, a typed placeholder when checking a template."""

    name: str
    type: str


ParamValues = dict[str, tuple[Any, Input]]  # name -> (value, declaration)
NODE_ID = NAME_PATTERN  # always fullmatch: "$" would let a trailing newline in
_NODE_KEYS = frozenset({"type", "template", "inputs"})
_TYPE_NODE_KEYS = _NODE_KEYS | {"version"}  # template nodes pin no version
MAX_EXPANDED_NODES = 20_000  # nodes that templates may add: real workflows have tens to hundreds
_DOCUMENT_KEYS = {"$schema", "graphflow", "name", "description", "params", "nodes", "outputs"}


def compile_document(document: dict[str, Any], registry: NodeRegistry, params: Mapping[str, Any] | None = None,
                     *, base_dir: Path | None = None, roots: tuple[Path, ...] = (),
                     as_template: bool = False, loader: TemplateLoader | None = None,
                     previous: CompiledGraph | None = None, in_folder: bool = False) -> CompiledGraph:
    """Validate `document` with the given param values and return the graph to run.

    Raises ValidationError listing every problem. Templates resolve against `base_dir` (the
    document's folder) and must lie inside it or inside one of `roots`. With `as_template`,
    params may stay unbound (checked by type where they are used), as when checking a template
    before its values are known; the result is then for checking only, not for running. A
    `loader` passed in keeps the template node types it loads, for the caller to reuse.
    `previous`, an earlier compile of this document (same registry, base and roots), lends
    every node whose entry is unchanged (graphflow.incremental), and is itself the result when
    nothing changed at all. `in_folder`: `base_dir` is the folder of the document's own file, where
    its relative file paths are looked up first (not so for a dict or a builder Graph).
    """
    values = dict(params or {})
    problems = shape_errors({"params": values})  # values given in Python skip every parser
    if problems:
        raise ValidationError(problems)
    document = migrate(dict(document), check_shape=False)  # checked as it is copied, below
    reuse = Reuse(previous, document, values, registry) if previous is not None and not as_template else None
    if reuse is not None and reuse.unchanged(document):
        return reuse.previous
    # the graph is compiled from a private copy, checked to be JSON data as it is made (documents built in Python
    # skip every parser); entries equal to the previous compile's take its copies, which were checked then
    if reuse is not None and reuse.previous.document is not None:
        before = reuse.previous
        document, param_users, entry_kinds = private_document(
            document, reuse.kept, before.document["nodes"], before.entry_kinds, before.param_users)
    else:
        document, param_users, entry_kinds = private_document(document)
    base = (base_dir or Path.cwd()).resolve()
    loader = loader or TemplateLoader(registry, (base, *(root.resolve() for root in roots)))
    compiler = _Compiler(registry, loader, as_template, reuse, (base,) if in_folder else ())
    graph = compiler.compile(document, values, base, prefix="", stack=())
    if not compiler.errors and not graph.outputs and not graph.output_nodes():
        compiler.errors.append(GraphError(
            Code.NO_OUTPUTS, "nothing would run: add an output node such as SaveImage, or name results "
            'under "outputs"', expected='an output node or an "outputs" entry', found="neither"))
    order = reuse.order(graph) if reuse is not None and not compiler.errors else None
    graph.order = order if order is not None else _topological_order(graph, compiler.errors)
    if compiler.errors:
        raise ValidationError(compiler.errors)
    graph.document, graph.param_users, graph.entry_kinds = document, param_users, entry_kinds
    if order is not None and reuse is not None:  # the same nodes and links: the plans carry over
        inherit_plans(graph, reuse.previous, frozenset(graph.nodes.keys() - reuse.kept.keys()))
    graph.given_params = copy.deepcopy(values)
    graph.registry = registry
    graph.template_files, graph.template_references = loader.files(), loader.references()
    graph.template_documents, graph.base_dir = loader.documents(), base
    return graph


def _topological_order(graph: CompiledGraph, errors: list[GraphError]) -> tuple[str, ...]:
    """All nodes, sources first; ties keep document order. Reports every cycle as an error."""
    position = {node_id: index for index, node_id in enumerate(graph.nodes)}
    # a source missing from the graph (a template node that failed to expand) is already an error
    edges = [(source, node.id) for node in graph.nodes.values() for source in node.sources if source in position]
    if all(position[source] < position[target] for source, target in edges):
        return tuple(graph.nodes)  # already sources-first: exactly what the sort below would return
    import networkx as nx

    dependencies = nx.DiGraph()
    dependencies.add_nodes_from(graph.nodes)
    dependencies.add_edges_from(edges)
    try:
        return tuple(nx.lexicographical_topological_sort(dependencies, key=position.__getitem__))
    except nx.NetworkXUnfeasible:
        pass
    for component in nx.strongly_connected_components(dependencies):
        if len(component) > 1 or any(dependencies.has_edge(node, node) for node in component):
            cycle = [edge[0] for edge in nx.find_cycle(dependencies.subgraph(component))]
            path = " -> ".join([*cycle, cycle[0]])
            errors.append(GraphError(Code.CYCLE, f"these nodes depend on each other in a loop: {path}", cycle[0],
                                     expected="a graph without cycles", found=path))
    return ()


def validate_document(document: dict[str, Any], registry: NodeRegistry, params: Mapping[str, Any] | None = None,
                      *, base_dir: Path | None = None, roots: tuple[Path, ...] = (),
                      as_template: bool = False) -> list[GraphError]:
    """Every problem in the document (empty when it is valid)."""
    try:
        compile_document(document, registry, params, base_dir=base_dir, roots=roots, as_template=as_template)
    except ValidationError as error:
        return error.errors
    return []


class _Compiler:
    def __init__(self, registry: NodeRegistry, loader: TemplateLoader, as_template: bool,
                 reuse: Reuse | None = None, folders: tuple[Path, ...] = ()) -> None:
        self.registry = registry
        self.folders = folders  # the top-level document's folder, when it is a file
        self.loader = loader
        self.as_template = as_template
        self.reuse = reuse  # what the top level takes from the previous compile (graphflow.incremental)
        self.expanded = 0  # nodes that template expansion has added so far
        self.errors: list[GraphError] = []
        self._placed: set[int] = set()  # ids of errors already placed inside a template

    def error(self, code: Code, message: str, node: str | None = None, input: str | None = None,
              expected: str | None = None, found: str | None = None) -> None:
        self.errors.append(GraphError(code, message, node, input, expected, found))

    def compile(self, document: dict[str, Any], values: dict[str, Any], base: Path, prefix: str,
                stack: tuple[Path, ...]) -> CompiledGraph:
        """Compile one document level; inside a template (`stack` not empty) ids get `prefix`."""
        first_error = len(self.errors)
        graph = self._compile_level(document, values, base, prefix, stack)
        if stack:  # place this level's errors on "template_node/inner_node", naming the template file
            self.errors[first_error:] = [error if id(error) in self._placed else self._place(error, stack[-1], prefix)
                                         for error in self.errors[first_error:]]
        return graph

    def _place(self, error: GraphError, path: Path, prefix: str) -> GraphError:
        placed = inside_template(error, path, prefix + error.node if error.node else prefix.rstrip("/"))
        self._placed.add(id(placed))
        return placed

    def _compile_level(self, document: dict[str, Any], values: dict[str, Any], base: Path, prefix: str,
                       stack: tuple[Path, ...]) -> CompiledGraph:
        for key in ("name", "description"):
            if not isinstance(document.get(key, ""), str):
                self.error(Code.INVALID_DOCUMENT, f'"{key}" is text', input=key, expected="a string",
                           found=types.describe_literal(document[key]))
        for key in document:
            if key not in _DOCUMENT_KEYS:
                self.error(Code.INVALID_DOCUMENT, f"unknown top-level key '{key}'{did_you_mean(key, _DOCUMENT_KEYS)}",
                           input=key,
                           expected=f"keys among {', '.join(sorted(_DOCUMENT_KEYS))}", found=repr(key))
        param_values = self._param_values(document, values)
        entries = document.get("nodes")
        if not isinstance(entries, dict):
            self.error(Code.INVALID_DOCUMENT, '"nodes" maps node ids to nodes', input="nodes",
                       expected="an object", found=types.describe_literal(entries))
            entries = {}
        reuse = self.reuse if not stack else None
        kept = reuse.kept if reuse is not None else {}
        classes = {node_id: kept[node_id].node_type if node_id in kept else
                   self._node_class(node_id, entry, base, stack) for node_id, entry in entries.items()}
        if reuse is not None:
            kept = reuse.settle(classes)
        compiled: dict[str, CompiledNode] = {}
        aliases: dict[Link, Link] = {}
        for node_id, node_type in classes.items():
            if node_id in kept:
                compiled[node_id] = kept[node_id]
                continue
            if node_type is None:
                continue
            known_errors = len(self.errors)
            inputs = self._inputs(node_id, entries[node_id], node_type, classes, param_values, prefix)
            if issubclass(node_type, TemplateNode):
                if len(self.errors) > known_errors:
                    continue  # expanding a template with bad inputs would only repeat those errors
                self._expand(node_id, node_type, inputs, compiled, aliases, prefix, stack)
            else:
                compiled[prefix + node_id] = CompiledNode(prefix + node_id, node_type, inputs,
                                                          folders=self._folders(stack))
        outputs = self._outputs(document, classes, prefix, reuse.outputs(document, classes) if reuse else {})
        if aliases:
            self._redirect(compiled, outputs, aliases)
        for node_id, node in compiled.items():
            if node_id not in kept:  # a kept node is shared with the previous graph, sources and all
                node.sources = tuple(dict.fromkeys(link.node for value in node.inputs.values()
                                                   for link in links_in(value)))
        return CompiledGraph(compiled, outputs, {name: value for name, (value, _) in param_values.items()},
                             param_values=param_values)

    def _folders(self, stack: tuple[Path, ...]) -> tuple[Path, ...]:
        """Where the relative paths of a node at this level are looked up first: its template's folder, then the
        folders of the documents using it, outward."""
        return tuple(dict.fromkeys([*(path.parent for path in reversed(stack)), *self.folders]))

    def _param_values(self, document: dict[str, Any], values: dict[str, Any]) -> ParamValues:
        """Each param's value (given, default, or Unbound) with its declared type."""
        specs, errors = parse_params(document)
        self.errors.extend(errors)
        for name in values:
            if name not in specs and not any(error.input == name for error in errors):
                self.errors.append(unknown_param_error(name, specs))
        resolved: ParamValues = {}
        for name, spec in specs.items():
            if name in values:
                value = values[name]
                # a Link (or list of them) comes from the node using this template, already type-checked there, and
                # an Unbound from that node's own param with no value, reported on that param
                problems = [] if links_in(value) or isinstance(value, Unbound) else param_value_errors(spec, value)
                self.errors.extend(problems)
                resolved[name] = (Unbound(name, spec.type) if problems else value, spec)
            elif spec.default is not REQUIRED:
                resolved[name] = (spec.default, spec)
            else:
                resolved[name] = (Unbound(name, spec.type), spec)
                if not self.as_template:
                    how = "--set NAME=VALUE" if spec.accepts_literal else "a link (use the template as a node)"
                    self.error(Code.MISSING_PARAM_VALUE, f"param '{name}' has no default; give it a value with {how}",
                               input=name, expected=f"{spec.type} value", found="nothing")
        return resolved

    def _node_class(self, node_id: str, entry: Any, base: Path, stack: tuple[Path, ...]) -> type[Node] | None:
        if not NODE_ID.fullmatch(node_id):
            self.error(Code.INVALID_NODE_ID, "node ids use letters, digits, '_' and '-' only", node_id,
                       expected=f"an id matching {NODE_ID.pattern}", found=repr(node_id))
            return None
        if not isinstance(entry, dict) or ("type" in entry) == ("template" in entry):
            self.error(Code.INVALID_DOCUMENT, 'a node is an object with either "type" or "template"', node_id,
                       expected='{"type": ..., "inputs": {...}}', found=types.describe_literal(entry))
            return None
        allowed = _TYPE_NODE_KEYS if "type" in entry else _NODE_KEYS
        extra = [] if entry.keys() <= allowed else sorted(set(entry) - allowed)
        if extra:
            self.error(Code.INVALID_DOCUMENT, f"unknown node keys {extra}", node_id,
                       expected=f"keys among {sorted(_NODE_KEYS)} (template nodes pin no version)", found=str(extra))
        if "version" in entry and not isinstance(entry["version"], str):
            self.error(Code.INVALID_DOCUMENT, 'a pinned "version" is a text such as "1.0.0"', node_id, "version",
                       "a string", types.describe_literal(entry["version"]))
        if "template" in entry:
            try:
                path = self.loader.resolve(str(entry["template"]), base, node_id)
                return self.loader.node_class(path, stack, node_id)
            except ValidationError as error:
                self.errors.extend(error.errors)
                return None
        type_name = entry["type"]
        node_type = self.registry.get(type_name) if isinstance(type_name, str) else None
        if node_type is None:
            hint = did_you_mean(str(type_name), self.registry.names()) or "; is the plugin that provides it installed?"
            self.error(Code.UNKNOWN_NODE_TYPE, f"no node type named {type_name!r}{hint}", node_id,
                       expected="a registered node type (see `graphflow nodes`)", found=repr(type_name))
            return None
        pinned = entry.get("version")
        if isinstance(pinned, str) and pinned.split(".")[0] != node_type.version.split(".")[0]:
            self.error(Code.UNSUPPORTED_VERSION, f"the document was written for {type_name} {pinned}; the installed "
                       f"{type_name} is {node_type.version}, which is not compatible", node_id, "version",
                       f"{node_type.version.split('.')[0]}.x", str(pinned))
        return node_type

    def _inputs(self, node_id: str, entry: dict[str, Any], node_type: type[Node],
                classes: dict[str, type[Node] | None], params: ParamValues, prefix: str) -> dict[str, Any]:
        given = entry.get("inputs", {})
        if not isinstance(given, dict):
            self.error(Code.INVALID_DOCUMENT, '"inputs" maps input names to values', node_id, expected="an object",
                       found=types.describe_literal(given))
            given = {}
        if not given.keys() <= node_type.input_map.keys():
            self.errors.extend(unknown_input_error(node_type, name, node_id) for name in given
                               if name not in node_type.input_map)
        inputs: dict[str, Any] = {}
        for spec in node_type.inputs:
            if spec.name in given:
                inputs[spec.name] = self._value(node_id, spec, given[spec.name], classes, params, prefix)
            elif spec.required:
                self.errors.append(missing_input_error(node_type, spec, node_id))
            else:
                inputs[spec.name] = None if spec.default is REQUIRED else spec.default
        return inputs

    def _value(self, node_id: str, spec: Input, value: Any, classes: dict[str, type[Node] | None],
               params: ParamValues, prefix: str) -> Any:
        if isinstance(value, list):
            if not spec.list:
                self.error(Code.INVALID_VALUE, "this input takes one value, not a list", node_id, spec.name,
                           f"{spec.type}", types.describe_literal(value))
                return None
            items: list[Any] = []
            unbound: Unbound | None = None
            for item in value:  # a list param's items take its place in the list
                checked = self._item(node_id, spec, item, classes, params, prefix)
                if isinstance(checked, Unbound):
                    unbound = unbound or checked
                spliced = _list_param(item, params) and isinstance(checked, list)
                items.extend(checked if spliced else [checked])
            return items if unbound is None else unbound  # a list holding a param with no value is not known yet
        item = self._item(node_id, spec, value, classes, params, prefix)
        if _list_param(value, params) or isinstance(item, Unbound):
            return item  # already the list, or not known yet
        return [item] if spec.list else item

    def _item(self, node_id: str, spec: Input, value: Any, classes: dict[str, type[Node] | None],
              params: ParamValues, prefix: str) -> Any:
        if isinstance(value, dict):
            if len(value) == 1 and isinstance(value.get("from"), str):
                if spec.file or spec.model:
                    self.errors.append(file_link_error(spec, node_id, repr(value)))
                    return None
                return self._link(node_id, spec.name, spec.type, value["from"], classes, prefix)
            if len(value) == 1 and isinstance(value.get("param"), str):
                return self._param(node_id, spec, value["param"], params)
            self.error(Code.INVALID_VALUE, 'an object value must be a link {"from": "node.output"} or a param '
                       '{"param": "name"}', node_id, spec.name, f"{spec.type}", types.describe_literal(value))
            return None
        self.errors.extend(spec.check_literal(value, node_id))
        return value

    def _link(self, node_id: str | None, input: str, expected: str | None, text: str,
              classes: dict[str, type[Node] | None], prefix: str) -> Link | None:
        """Check a "node.output" reference; `expected` is the input's type (None accepts any)."""
        link = Link.parse(text)
        if link is None:
            self.error(Code.BAD_LINK, 'links name a node and one of its outputs as "node.output"', node_id,
                       input, '"node.output"', repr(text))
            return None
        if link.node not in classes:
            self.error(Code.BAD_LINK, f"the link names node '{link.node}', which is not in the graph"
                       f"{did_you_mean(link.node, classes)}",
                       node_id, input, "an existing node id", repr(text))
            return None
        source = classes[link.node]
        if source is None:
            return None  # the source node's own error is already reported
        output = source.output_map.get(link.output)
        if output is None:
            self.error(Code.BAD_LINK, f"{source.type_name} '{link.node}' has no output '{link.output}'", node_id,
                       input, f"one of {', '.join(source.output_map) or '(no outputs)'}", repr(text))
            return None
        if expected is not None and not types.is_compatible(output.type, expected):
            self.error(Code.TYPE_MISMATCH, f"{link} is {output.type} but '{input}' takes {expected}",
                       node_id, input, expected, f"{output.type} from {link}")
            return None
        return Link(prefix + link.node, link.output)

    def _param(self, node_id: str, spec: Input, name: str, params: ParamValues) -> Any:
        if name not in params:
            self.error(Code.UNKNOWN_PARAM, f"the input uses param '{name}', which the document does not declare "
                       "or which has no value", node_id, spec.name, 'a name declared under "params"', repr(name))
            return None
        value, declared = params[name]
        param_type = f"a list of {declared.type}" if declared.list else declared.type
        if not types.is_compatible(declared.type, spec.type) or (declared.list and not spec.list):
            takes = f"a list of {spec.type}" if spec.list else f"one {spec.type}"
            self.error(Code.TYPE_MISMATCH, f"param '{name}' is {param_type} but '{spec.name}' takes {takes}",
                       node_id, spec.name, takes, f"{param_type} param '{name}'")
            return None
        if isinstance(value, Unbound):
            return value  # no value to check; a missing one is reported once, on the param
        if links_in(value):
            if spec.file or spec.model:
                self.errors.append(file_link_error(spec, node_id, f"param '{name}' linked to {value}"))
                return None
            return value
        self.errors.extend(spec.check_literal(value, node_id))
        return value

    def _expand(self, node_id: str, node_type: type[TemplateNode], inputs: dict[str, Any],
                compiled: dict[str, CompiledNode], aliases: dict[Link, Link], prefix: str,
                stack: tuple[Path, ...]) -> None:
        path = node_type.template_path
        nodes = node_type.template_document.get("nodes", {})
        self.expanded += len(nodes) if isinstance(nodes, dict) else 0
        if self.expanded > MAX_EXPANDED_NODES:  # templates that use templates many times each multiply
            if not any(error.code == Code.INVALID_DOCUMENT and error.input == "template" for error in self.errors):
                self.error(Code.INVALID_DOCUMENT, f"its templates expand to more than {MAX_EXPANDED_NODES:,} nodes",
                           prefix + node_id, "template", f"at most {MAX_EXPANDED_NODES:,} nodes", "more")
            return
        values = {name: value for name, value in inputs.items() if value is not None}
        inner = self.compile(node_type.template_document, values, path.parent, f"{prefix}{node_id}/", (*stack, path))
        compiled.update(inner.nodes)
        for name, target in inner.outputs.items():
            aliases[Link(prefix + node_id, name)] = target

    def _outputs(self, document: dict[str, Any], classes: dict[str, type[Node] | None],
                 prefix: str, kept: dict[str, Link]) -> dict[str, Link]:
        """The graph outputs; those in `kept` are known valid, from the previous compile."""
        raw = document.get("outputs", {})
        if not isinstance(raw, dict):
            self.error(Code.INVALID_DOCUMENT, '"outputs" maps result names to "node.output"', input="outputs",
                       expected="an object", found=types.describe_literal(raw))
            return {}
        outputs: dict[str, Link] = {}
        for name, target in raw.items():
            if name in kept:
                outputs[name] = kept[name]
                continue
            if not isinstance(target, str):
                self.error(Code.BAD_LINK, "a graph output names a node output", input=name,
                           expected='"node.output"', found=types.describe_literal(target))
                continue
            link = self._link(None, name, None, target, classes, prefix)
            if link is not None:
                outputs[name] = link
        return outputs

    @staticmethod
    def _redirect(compiled: dict[str, CompiledNode], outputs: dict[str, Link], aliases: dict[Link, Link]) -> None:
        def follow(value: Any) -> Any:
            if isinstance(value, Link):
                return aliases.get(value, value)
            if isinstance(value, list):
                return [follow(item) for item in value]
            return value

        for node in compiled.values():
            inputs = {name: follow(value) for name, value in node.inputs.items()}
            if inputs != node.inputs:  # nodes kept from a previous compile link to no template: left untouched
                node.inputs = inputs
        for name, link in outputs.items():
            outputs[name] = follow(link)


def _list_param(value: Any, params: ParamValues) -> bool:
    """Whether `value` is a reference to a list-typed param."""
    if type(value) is not dict or len(value) != 1 or not isinstance(value.get("param"), str):
        return False
    declared = params.get(value["param"])
    return declared is not None and declared[1].list
