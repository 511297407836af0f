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
    # the folders of the documents the node came from, innermost template first, where its relative file paths are
    # looked up first (graphflow.paths); none for a document that is no file (a dict, a builder Graph)
    folders: tuple[Path, ...] = ()
    # the last cache key made for this node and what it was made from (upstream keys, file digests, options): a
    # node kept by an incremental compile keeps its key while those are unchanged. One tuple, replaced whole, so
    # threads sharing the node never see the parts of two different keys.
    key_memo: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], str] | None = None


@dataclass
class CompiledGraph:
    """Nodes in document order (templates expanded in place as `template_id/inner_id`)."""

    nodes: dict[str, CompiledNode]
    outputs: dict[str, Link]
    params: dict[str, Any] = field(default_factory=dict)
    document: dict[str, Any] | None = None  # a private copy of what was compiled, safe from the caller's later edits
    order: tuple[str, ...] = ()  # every node, sources before consumers
    template_files: dict[Path, str] = field(default_factory=dict)  # template file -> content digest
    template_references: dict[Path, Path] = field(default_factory=dict)  # template path as written -> file
    template_documents: dict[Path, dict[str, Any]] = field(default_factory=dict)  # template file -> what it held
    base_dir: Path | None = None  # the folder the document's template paths resolved against
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)  # plans and keys per target set
    # what the next compile of this document may keep (graphflow.incremental): the param values with their
    # declared types, the top-level nodes that use a param, and the values the caller gave
    param_values: dict[str, tuple[Any, Any]] = field(default_factory=dict, repr=False, compare=False)
    param_users: frozenset[str] = field(default=frozenset(), repr=False, compare=False)
    given_params: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # as passed to compile
    registry: Any = field(default=None, repr=False, compare=False)  # the NodeRegistry it was compiled against
    entry_kinds: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # document.EntryKinds

    def output_nodes(self) -> list[str]:
        return [node.id for node in self.nodes.values() if node.node_type.is_output]


def links_in(value: Any) -> list[Link]:
    """The links inside one input value."""
    if isinstance(value, Link):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, Link)]
    return []
