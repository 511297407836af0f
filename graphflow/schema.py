"""The JSON Schema (draft 2020-12) of graph documents, generated from the node registry.

Documents may name it in "$schema" so that editors complete node types and inputs and check
values; `jsonschema` validates against it. It checks shape and literal values; links, types
across edges and cycles are `graphflow validate`'s job.

Node entries are told apart by their "type" (one `if`/`then` per node type) and params by theirs,
so a checker reports the one branch that applies ("'radius' was unexpected" under Canny) instead
of "not valid under any of the given schemas". The `$id`, SCHEMA_ID, names the document format
version and stays the same for every graphflow release that writes that version.
"""

from __future__ import annotations

from typing import Any

from graphflow import types
from graphflow.document import FORMAT_VERSION, NAME_PATTERN
from graphflow.node import REQUIRED, Input, Node
from graphflow.registry import NodeRegistry
from graphflow.validation import NODE_ID

SCHEMA_ID = f"https://graphflow.dev/schema/graph-{FORMAT_VERSION}.json"  # an identifier, not a download location
TYPE_KEYWORD = "x-graphflow-type"  # on each input: its value type (JSON Schema keeps unknown keywords as annotations)
_LITERAL_SCHEMAS = {types.INT: "integer", types.FLOAT: "number", types.BOOL: "boolean", types.STRING: "string"}


def document_schema(registry: NodeRegistry) -> dict[str, Any]:
    """A schema accepting exactly the documents whose nodes and literals fit `registry`."""
    definitions: dict[str, Any] = {
        "link": {"type": "object", "description": "Output of another node.", "required": ["from"],
                 "properties": {"from": {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_\-]*\.[^.]+$"}},
                 "additionalProperties": False},
        "paramRef": {"type": "object", "description": "Value of a template parameter.", "required": ["param"],
                     "properties": {"param": {"type": "string", "pattern": _whole(NAME_PATTERN.pattern)}},
                     "additionalProperties": False},
        "param": _param_schema(),
        "templateNode": {"type": "object", "description": "Another graph document used as one node.",
                         "required": ["template"], "additionalProperties": False,
                         "properties": {"template": {"type": "string"}, "inputs": {"type": "object"}}},
    }
    for node in registry:
        definitions[f"node.{node.type_name}"] = _node_schema(node)
    definitions["node"] = _node_choice(registry)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "graphflow graph document",
        "type": "object",
        "required": ["graphflow", "nodes"],
        "additionalProperties": False,
        "properties": {
            "$schema": {"type": "string"},
            "graphflow": {"const": FORMAT_VERSION, "description": "Document format version."},
            "name": {"type": "string"},
            "description": {"type": "string"},
            "params": {"type": "object", "propertyNames": {"pattern": _whole(NAME_PATTERN.pattern)},
                       "additionalProperties": {"$ref": "#/$defs/param"}},
            "nodes": {"type": "object", "propertyNames": {"pattern": _whole(NODE_ID.pattern)},
                      "additionalProperties": {"$ref": "#/$defs/node"}},
            "outputs": {"type": "object", "additionalProperties": {"type": "string", "pattern": r"^[^.]+\.[^.]+$"}},
        },
        "$defs": definitions,
    }


def _whole(pattern: str) -> str:
    """A pattern the whole text must match, in ECMA-262 and in Python's re (whose "$" also matches before a final
    newline: the lookahead refuses one)."""
    return f"^{pattern}$(?!\\n)"


def _node_choice(registry: NodeRegistry) -> dict[str, Any]:
    """A node entry: a template node when it names a "template", else the schema of the node type it names.

    `if`/`then` rather than `oneOf`: a `oneOf` fails with every branch's errors at once, which checkers summarise as
    "not valid under any of the given schemas"; here only the named type's branch is checked and reported.
    """
    by_type = [{"if": {"required": ["type"], "properties": {"type": {"const": node.type_name}}},
                "then": {"$ref": f"#/$defs/node.{node.type_name}"}} for node in registry]
    return {"type": "object", "description": "A node type with its inputs, or a template document used as one node.",
            "properties": {"type": {"enum": list(registry.names()), "description": "A registered node type."},
                           "template": {"type": "string", "description": "Path of a graph document, relative to "
                                        "this document's folder."}},
            "if": {"required": ["template"]}, "then": {"$ref": "#/$defs/templateNode"},
            "else": {"required": ["type"], "allOf": by_type}}


def _node_schema(node: type[Node]) -> dict[str, Any]:
    required = [spec.name for spec in node.inputs if spec.required]
    inputs: dict[str, Any] = {"type": "object", "properties": {spec.name: input_schema(spec) for spec in node.inputs},
                              "additionalProperties": False}
    if required:
        inputs["required"] = required
    return {"type": "object", "description": (node.__doc__ or "").strip().split("\n")[0],
            "required": ["type", "inputs"] if required else ["type"], "additionalProperties": False,
            "properties": {"type": {"const": node.type_name}, "version": {"type": "string"}, "inputs": inputs}}


def input_schema(spec: Input) -> dict[str, Any]:
    """What one input accepts: a literal of its type (scalars only), a link or a param reference."""
    # file and model inputs take no links: what they name is keyed before anything runs
    single: list[dict[str, Any]] = [{"$ref": "#/$defs/paramRef"}] if spec.file or spec.model else \
        [{"$ref": "#/$defs/link"}, {"$ref": "#/$defs/paramRef"}]
    literal = _literal_schema(spec)
    if literal is not None:
        single.insert(0, literal)
    options = single + ([{"type": "array", "items": {"anyOf": single}}] if spec.list else [])
    # the value type is an annotation for tools (editors, UIs): JSON cannot check an IMAGE, only a link to one
    schema: dict[str, Any] = {"anyOf": options, "description": spec.description, TYPE_KEYWORD: spec.type}
    if spec.default is not REQUIRED:
        schema["default"] = spec.default
    return schema


def _literal_schema(spec: Input) -> dict[str, Any] | None:
    json_type = _LITERAL_SCHEMAS.get(spec.type)
    if json_type is None:
        return None
    schema: dict[str, Any] = {"type": json_type}
    if spec.choices is not None:
        schema["enum"] = list(spec.choices)
    if spec.min is not None:
        schema["minimum"] = spec.min
    if spec.max is not None:
        schema["maximum"] = spec.max
    return schema


def _param_schema() -> dict[str, Any]:
    # every type known when the schema is made, the node packs' own among them, each with what its values are
    known = types.known_types()
    value_types = [{"const": name, "description": spec.description} for name, spec in known.items()]
    return {"type": "object", "required": ["type"], "additionalProperties": False,
            "properties": {"type": {"anyOf": value_types}, "list": {"type": "boolean"}, "default": {},
                           "description": {"type": "string"},
                           "min": {"type": "number"}, "max": {"type": "number"}, "choices": {"type": "array"}},
            "allOf": [{"if": {"required": ["type"], "properties": {"type": {"const": name}}},
                       "then": _param_type_schema(name)} for name in known]}


def _param_type_schema(type_name: str) -> dict[str, Any]:
    """What a param of one type may declare, as graphflow.templates checks it: only scalars have a default, a
    list, choices; only numbers a min and max; a list param's default is a list."""
    # the keys a type does not take are left out, so the message names the key ("'min' was unexpected")
    allowed: dict[str, Any] = {"type": {}, "description": {}}
    json_type = _LITERAL_SCHEMAS.get(type_name)
    if json_type is None:  # values of this type only arrive through links
        return {"properties": allowed, "additionalProperties": False}
    literal = {"type": json_type}
    allowed |= {"list": {}, "default": {}, "choices": {"type": "array", "items": literal}}
    if type_name in (types.INT, types.FLOAT):
        allowed |= {"min": {}, "max": {}}
    return {"properties": allowed, "additionalProperties": False,
            "if": {"required": ["list"], "properties": {"list": {"const": True}}},
            "then": {"properties": {"default": {"type": "array", "items": literal}}},
            "else": {"properties": {"default": literal}}}
