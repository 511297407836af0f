"""Constants, arithmetic and text for templates: Int, Float, String, Bool, Math and JoinText."""

from __future__ import annotations

from typing import Any

from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from graphflow.node import Input, Node, Output
from graphflow.types import BOOL, FLOAT, INT, STRING


class Int(Node):
    """An integer constant, to share one value among several inputs."""

    category = "primitive"
    inputs = (Input("value", INT, "The integer.", default=0),)
    outputs = (Output("value", INT),)

    def run(self, ctx: RunContext, value: int) -> dict[str, Any]:
        return {"value": value}


class Float(Node):
    """A floating-point constant."""

    category = "primitive"
    inputs = (Input("value", FLOAT, "The number.", default=0.0),)
    outputs = (Output("value", FLOAT),)

    def run(self, ctx: RunContext, value: float) -> dict[str, Any]:
        return {"value": float(value)}


class String(Node):
    """A text constant."""

    category = "primitive"
    inputs = (Input("value", STRING, "The text.", default=""),)
    outputs = (Output("value", STRING),)

    def run(self, ctx: RunContext, value: str) -> dict[str, Any]:
        return {"value": value}


class Bool(Node):
    """A true/false constant."""

    category = "primitive"
    inputs = (Input("value", BOOL, "The truth value.", default=False),)
    outputs = (Output("value", BOOL),)

    def run(self, ctx: RunContext, value: bool) -> dict[str, Any]:
        return {"value": value}


class JoinText(Node):
    """Join texts with a separator, e.g. a template's style param and a fixed prompt."""

    category = "primitive"
    inputs = (
        Input("texts", STRING, "The texts, in order; empty ones are left out.", list=True),
        Input("separator", STRING, "Put between consecutive texts.", default=", "),
    )
    outputs = (Output("text", STRING),)

    def run(self, ctx: RunContext, texts: list[str], separator: str) -> dict[str, Any]:
        return {"text": separator.join(text for text in texts if text)}


class SelectText(Node):
    """Pick a text by name from a table, e.g. a style's prompt: texts[i] for the i-th of names, else the fallback."""

    category = "primitive"
    inputs = (
        Input("name", STRING, "What to look up, e.g. a template's style param."),
        Input("names", STRING, "The table's names, in order; a name given twice picks its first text.", list=True),
        Input("texts", STRING, "The table's texts, one per name.", list=True),
        Input("fallback", STRING, "The text for a name that is not in the table.", default=""),
    )
    outputs = (Output("text", STRING, "The text of the name, or the fallback."),)

    def run(self, ctx: RunContext, name: str, names: list[str], texts: list[str], fallback: str) -> dict[str, Any]:
        if len(names) != len(texts):
            raise NodeInputError(f"the table has {len(names)} names but {len(texts)} texts; give one text per name")
        return {"text": texts[names.index(name)] if name in names else fallback}


_OPERATIONS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "min": min,
    "max": max,
}


class Math(Node):
    """Arithmetic on two numbers: add, sub, mul, div, min or max."""

    category = "primitive"
    inputs = (
        Input("a", FLOAT, "Left operand."),
        Input("b", FLOAT, "Right operand.", default=0.0),
        Input("op", STRING, "Operation.", default="add", choices=tuple(_OPERATIONS)),
    )
    outputs = (Output("result", FLOAT),)

    def run(self, ctx: RunContext, a: float, b: float, op: str) -> dict[str, Any]:
        if op == "div" and b == 0:
            raise NodeInputError("division by zero: input 'b' is 0")
        return {"result": float(_OPERATIONS[op](a, b))}
