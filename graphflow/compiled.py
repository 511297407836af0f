"""An executable graph: a validated document with params substituted and templates inlined."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphflow.node import Node


@dataclass(frozen=True, slots=True)
class Link:
    """A reference to output `output` of node `node`: `{"from": "node.output"}` in documents."""

    node: str
    output: str

    @classmethod
    def parse(cls, text: str) -> Link | None:
        node, dot, output = text.partition(".")
        return cls(node, output) if dot and node and output and "." not in output else None

    def __str__(self) -> str:
        return f"{self.node}.{self.output}"


@dataclass(slots=True)
class CompiledNode:
    """One node ready to run: every input is a literal, a Link, a list of those, or None."""

    id: str
    node_type: type[Node]
    inputs: dict[str, Any]
    sources: tuple[str, ...] = ()


@dataclass
class CompiledGraph:
    """Nodes in document order (templates expanded in place as `template_id/inner_id`)."""

    nodes: dict[str, CompiledNode]
    outputs: dict[str, Link]
    params: dict[str, Any] = field(default_factory=dict)
    document: dict[str, Any] | None = None
    order: tuple[str, ...] = ()  # every node, sources before consumers
    template_files: dict[Path, str] = field(default_factory=dict)  # template file -> content digest
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)  # plans and keys per target set

    def output_nodes(self) -> list[str]:
        return [node.id for node in self.nodes.values() if node.node_type.is_output]


def links_in(value: Any) -> list[Link]:
    """The links inside one input value."""
    if isinstance(value, Link):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, Link)]
    return []
