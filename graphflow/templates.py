"""Templates: documents with named, typed params, run with values or used as one node.

A template used inside another graph becomes a node type whose inputs are its params and whose
outputs are its named `outputs`. Parameter values are data only; nothing is evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphflow import types
from graphflow.cache import file_digest
from graphflow.compiled import Link
from graphflow.document import NAME_PATTERN, migrate, parse_document, read_document_text, shape_errors
from graphflow.errors import Code, GraphError, ValidationError, did_you_mean
from graphflow.node import REQUIRED, Input, Node, Output, reserved_output_name
from graphflow.paths import file_kind
from graphflow.registry import NodeRegistry

_PARAM_KEYS = {"type", "list", "default", "description", "min", "max", "choices"}
MAX_TEMPLATE_DEPTH = 32  # templates used inside templates; real graphs nest two or three


def parse_params(document: dict[str, Any]) -> tuple[dict[str, Input], list[GraphError]]:
    """The document's params as typed input specs, plus every problem in their declarations."""
    raw = document.get("params", {})
    if not isinstance(raw, dict):
        return {}, [GraphError(Code.INVALID_DOCUMENT, '"params" maps names to declarations',
                               input="params", expected="an object", found=types.describe_literal(raw))]
    unwritable = shape_errors({"params": raw})  # checked again for callers that skip migrate, such as Graph.param
    if unwritable:
        return {}, unwritable
    specs: dict[str, Input] = {}
    errors: list[GraphError] = []
    for name, declaration in raw.items():
        spec, problems = _param_spec(name, declaration)
        errors.extend(problems)
        if spec is not None:
            specs[name] = spec
    return specs, errors


def _param_spec(name: str, declaration: Any) -> tuple[Input | None, list[GraphError]]:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        # the rule of node ids: a name --set NAME=VALUE can write and a link or JSON Schema can name
        return None, [GraphError(Code.INVALID_PARAM, "param names use letters, digits, '_' and '-' only",
                                 input=name if isinstance(name, str) else None,
                                 expected=f"a name matching {NAME_PATTERN.pattern}", found=types.show_value(name))]
    problems = _declaration_problems(declaration)
    if problems:
        message, expected, found = problems
        return None, [GraphError(Code.INVALID_PARAM, f"param '{name}' {message}", input=name, expected=expected,
                                 found=found)]
    choices = declaration.get("choices")
    spec = Input(name, declaration["type"], declaration.get("description", ""), declaration.get("default", REQUIRED),
                 declaration.get("min"), declaration.get("max"), tuple(choices) if choices is not None else None,
                 list=declaration.get("list", False))
    if spec.default is not REQUIRED:
        errors = param_value_errors(spec, spec.default)
        if errors:
            return None, [GraphError(Code.INVALID_PARAM, f"the default of param '{name}' is not valid: "
                                     f"{errors[0].message}", input=name, expected=errors[0].expected,
                                     found=errors[0].found)]
    return spec, []


def _declaration_problems(declaration: Any) -> tuple[str, str, str] | None:
    """(message, expected, found) for the first thing wrong with a param declaration, else None."""
    if not isinstance(declaration, dict):
        return "must be declared as an object", '{"type": ...}', types.describe_literal(declaration)
    type_name = declaration.get("type")
    if not isinstance(type_name, str) or not types.is_known(type_name):
        return "has an unknown type", f"one of {', '.join(types.known_types())}", types.describe_literal(type_name)
    extra = sorted(set(declaration) - _PARAM_KEYS)
    if extra:
        return f"has unknown keys {extra}", f"keys among {sorted(_PARAM_KEYS)}", str(extra)
    if not isinstance(declaration.get("description", ""), str):
        return "has a description that is not text", "a string", types.describe_literal(declaration["description"])
    if "list" in declaration and (type(declaration["list"]) is not bool or type_name not in types.SCALAR_TYPES):
        return "has a 'list' that does not apply", "true or false, on an INT, FLOAT, BOOL or STRING param", \
            f"{types.describe_literal(declaration['list'])} on {type_name}"
    for bound in ("min", "max"):
        if bound in declaration and (type_name not in (types.INT, types.FLOAT)
                                     or not types.literal_matches(types.FLOAT, declaration[bound])):
            return f"has a '{bound}' that does not apply", "a number, on an INT or FLOAT param", \
                f"{types.describe_literal(declaration[bound])} on {type_name}"
    if "choices" in declaration and (type_name not in types.SCALAR_TYPES or not isinstance(declaration["choices"], list)
                                     or not all(types.literal_matches(type_name, c) for c in declaration["choices"])):
        return "has choices that do not fit its type", f"a list of {type_name} values", \
            types.describe_literal(declaration["choices"])
    return None


def param_value_errors(spec: Input, value: Any) -> list[GraphError]:
    """Errors for a literal value of the param `spec`: a list of its type for a list param (each item checked
    against its choices and range), one value of its type otherwise."""
    if spec.list and not isinstance(value, list):
        return [GraphError(Code.INVALID_VALUE, f"param '{spec.name}' is a list of {spec.type}", None, spec.name,
                           f"a list of {spec.type}", types.describe_literal(value))]
    if not spec.list and isinstance(value, list):
        return [GraphError(Code.INVALID_VALUE, f"param '{spec.name}' takes one {spec.type}, not a list", None,
                           spec.name, spec.type, types.describe_literal(value))]
    return spec.check_literal(value, None)


class TemplateNode(Node):
    """Base of the node types made from template documents."""

    type_name = "Template"
    category = "template"
    template_path: Path
    template_document: dict[str, Any]

    def run(self, ctx: Any, /, **inputs: Any) -> dict[str, Any]:  # params may be named ctx or self
        raise TypeError("template nodes are expanded into their nodes before a run")


@dataclass
class TemplateLoader:
    """Loads template documents once per run and turns each into a node type.

    Templates resolve relative to the document that uses them and must stay inside `roots`.
    """

    registry: NodeRegistry
    roots: tuple[Path, ...]

    def __post_init__(self) -> None:
        self._classes: dict[Path, type[TemplateNode]] = {}
        self._digests: dict[Path, str] = {}
        self._references: dict[Path, Path] = {}

    def files(self) -> dict[Path, str]:
        """The template files loaded so far with the digests of the bytes that were read."""
        return dict(self._digests)

    def documents(self) -> dict[Path, dict[str, Any]]:
        """The template files loaded so far -> the documents parsed from them (what `graphflow.inline` inlines)."""
        return {path: cls.template_document for path, cls in self._classes.items()}

    def references(self) -> dict[Path, Path]:
        """Each template path as written (joined to the folder it is relative to) -> the file it resolved to: a
        symlink along it pointed elsewhere later names another template."""
        return dict(self._references)

    def resolve(self, reference: str, base_dir: Path, node: str) -> Path:
        """The template file `reference` names, relative to `base_dir`: a regular file inside the roots."""
        path = _resolved(base_dir / reference, node, reference)
        self._references[base_dir / reference] = path
        if not any(path.is_relative_to(root) for root in self.roots):  # checked first: says nothing of what is there
            raise ValidationError([GraphError(
                Code.PATH_OUTSIDE_ROOT, "templates must lie inside the input directories or beside the graph",
                node, "template", "a path inside " + ", ".join(map(str, self.roots)), reference)])
        _require_file(path, node, reference)
        return path

    def node_class(self, path: Path, stack: tuple[Path, ...], node: str) -> type[TemplateNode]:
        """The node type of the template at `path`; `stack` lists the templates being expanded."""
        if path in stack:
            chain = " -> ".join(p.name for p in (*stack, path))
            raise ValidationError([GraphError(Code.RECURSIVE_TEMPLATE, f"templates include each other: {chain}",
                                              node, "template", "a template that does not use itself", chain)])
        if len(stack) >= MAX_TEMPLATE_DEPTH:  # each level is a few frames of recursion, here and in validation
            raise ValidationError([GraphError(
                Code.RECURSIVE_TEMPLATE, f"templates nest more than {MAX_TEMPLATE_DEPTH} deep: {stack[0].name} -> "
                f"... -> {path.name}", node, "template", f"at most {MAX_TEMPLATE_DEPTH} templates inside each other",
                f"{len(stack) + 1} levels")])
        cached = self._classes.get(path)
        if cached is not None:
            return cached
        try:
            text = read_document_text(path)
            self._digests[path] = file_digest(text.encode("utf-8"))  # the same bytes: the file decoded as UTF-8
            document = parse_document(text, str(path))
        except ValidationError as error:  # unreadable or not a document: placed on the node that uses it
            raise ValidationError([dataclasses.replace(problem, node=node, input="template")
                                   for problem in error.errors]) from None
        params, errors = parse_params(document)
        targets = document.get("outputs", {})
        if not isinstance(document.get("nodes"), dict) or not isinstance(targets, dict):
            errors.append(GraphError(Code.INVALID_DOCUMENT, '"nodes" and "outputs" must be objects',
                                     expected="objects", found="something else"))
        elif clashes := [name for name, target in targets.items() if not isinstance(target, str)
                         or not NAME_PATTERN.fullmatch(name) or reserved_output_name(TemplateNode, name)]:
            errors.append(GraphError(Code.INVALID_DOCUMENT, f"outputs {clashes} cannot be template outputs: each must "
                                     'be a "node.output" text, named like a param and other than a Node attribute '
                                     "such as run", expected="other output names", found=types.show_value(clashes)))
        if errors:
            raise ValidationError([inside_template(error, path, f"{node}/{error.node}" if error.node else node)
                                   for error in errors])
        outputs = [Output(name, self._output_type(document, target, path, (*stack, path), node))
                   for name, target in targets.items()]
        description = document.get("description", "")
        cls = type(f"Template_{path.stem}", (TemplateNode,), {
            "type_name": f"template:{path.name}", "inputs": tuple(params.values()), "outputs": tuple(outputs),
            "template_path": path, "template_document": document,
            "__doc__": description if isinstance(description, str) else ""})
        self._classes[path] = cls
        return cls

    def _output_type(self, document: dict[str, Any], target: str, path: Path, stack: tuple[Path, ...],
                     node: str) -> str:
        link = Link.parse(target)
        entry = document.get("nodes", {}).get(link.node) if link else None
        source = None
        if isinstance(entry, dict) and "template" in entry:
            source = self.node_class(self.resolve(str(entry["template"]), path.parent, node), stack, node)
        elif isinstance(entry, dict):
            source = self.registry.get(str(entry.get("type")))
        spec = source.output_map.get(link.output) if source and link else None
        if spec is None:
            raise ValidationError([GraphError(Code.BAD_LINK, f"template {path.name} names an output that does not "
                                              "exist", node, "template", "node.output of the template", target)])
        return spec.type


def _resolved(path: Path, node: str, reference: str) -> Path:
    """`path` made absolute with every symlink followed."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError) as error:  # a symlink loop (RuntimeError before 3.13), a NUL byte
        raise ValidationError([GraphError(Code.TEMPLATE_NOT_FOUND, f"the template path cannot be resolved: "
                                          f"{_reason(error)}", node, "template", "an existing graph document",
                                          reference)]) from None


def _require_file(path: Path, node: str, reference: str) -> None:
    """Refuse a template path that names nothing, a directory, a FIFO or a device."""
    try:
        kind = file_kind(os.stat(path).st_mode)
        problem = f"the template at {path} is {kind}, not a file" if kind else None
    except OSError as error:
        problem = f"no template file at {path}: {_reason(error)}"
    if problem:
        raise ValidationError([GraphError(Code.TEMPLATE_NOT_FOUND, problem, node, "template",
                                          "an existing graph document file", reference)])


def _reason(error: BaseException) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def inside_template(error: GraphError, path: Path, node: str) -> GraphError:
    """An error found in the template at `path`, placed on `node` (e.g. "user_node/inner_node")."""
    return GraphError(error.code, f"in template {path.name}: {error.message}", node, error.input,
                      error.expected, error.found)


def unknown_param_error(name: str, specs: dict[str, Input]) -> GraphError:
    """The error for a value given to a param the document does not declare."""
    return GraphError(Code.UNKNOWN_PARAM, f"the document declares no param '{name}'{did_you_mean(name, specs)}",
                      input=name, expected=f"one of {', '.join(specs) or '(no params)'}", found=repr(name))


def parse_assignments(document: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Param values from command-line `NAME=VALUE` strings, parsed by each param's type.

    Raises ValidationError listing every bad assignment.
    """
    specs, declaration_errors = parse_params(migrate(dict(document)))
    values: dict[str, Any] = {}
    errors: list[GraphError] = []
    for assignment in assignments:
        name, equals, text = assignment.partition("=")
        spec = specs.get(name)
        declared_badly = [error for error in declaration_errors if error.input == name]
        if not equals:
            errors.append(GraphError(Code.INVALID_VALUE, "write --set NAME=VALUE", input=assignment,
                                     expected="NAME=VALUE", found=repr(assignment)))
        elif declared_badly:
            errors.extend(declared_badly)
        elif spec is None:
            errors.append(unknown_param_error(name, specs))
        else:
            expected = f"a list of {spec.type} (1,2,3 or a JSON list)" if spec.list else spec.type
            try:
                values[name] = parse_list_text(spec.type, text) if spec.list else types.parse_text(spec.type, text)
            except ValueError as error:
                errors.append(GraphError(Code.INVALID_VALUE, f"cannot read {text!r} as {expected}: {error}",
                                         input=name, expected=expected, found=repr(text)))
    if errors:
        raise ValidationError(errors)
    return values


def parse_list_text(type_name: str, text: str) -> list[Any]:
    """A list param's value from the command line: a JSON list (`[1, 2]`, `["a, b", "c"]`), or items separated
    by commas (`0,1,2,3`), each read as `type_name`; an empty text is the empty list."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as error:
            raise ValueError(f"not a JSON list ({error.msg})") from None
        if not isinstance(items, list):
            raise ValueError("not a JSON list")
        if not all(types.literal_matches(type_name, item) for item in items):
            raise ValueError(f"every item must be {type_name}")
        return items
    if not stripped:
        return []
    return [types.parse_text(type_name, item.strip() if type_name != types.STRING else item)
            for item in text.split(",")]


class Template:
    """A template document in Python: its typed params, a run with values, or one node in another graph.

        room = Template("graphs/demo.json")
        room.run(seed=7)                       # like `graphflow run graphs/demo.json --set seed=7`
        g.add(room(photo=photo.image), "room") # like {"template": "graphs/demo.json", ...}
    """

    def __init__(self, path: str | Path, registry: NodeRegistry | None = None) -> None:
        from graphflow.registry import default_registry

        self.registry = registry if registry is not None else default_registry()
        self.path = _resolved(Path(path), Path(path).name, str(path))
        _require_file(self.path, self.path.name, str(path))
        self.node_type = TemplateLoader(self.registry, (self.path.parent,)).node_class(self.path, (), self.path.name)

    @property
    def params(self) -> dict[str, Input]:
        return dict(self.node_type.input_map)

    def run(self, engine: Any = None, **values: Any) -> Any:
        """Run the template with these param values (defaults for the rest); returns the RunResult."""
        from graphflow.engine import Engine

        engine = engine if engine is not None else Engine(self.registry)
        return engine.run(self.path, values)

    def __call__(self, **inputs: Any) -> TemplateNode:
        """One use of the template as a node; its params are the inputs, checked at the call."""
        return self.node_type(**inputs)
