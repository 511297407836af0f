"""One self-contained document from a document that uses templates: every template node replaced by its nodes.

A PNG written by SaveImage embeds this form, so that it re-runs without the template files beside it. The
document's own params stay params (`--set` still applies); a template's params become the values the using
node gave them (links, literals, or the outer document's params) or the template's defaults. Node ids of the
inlined nodes are `TEMPLATE_NODE__INNER_NODE` (with `-2`, `-3`, ... when that id is taken). A relative file path
written in a template (a LoadImage path, or a param default that reaches one) is relative to the template's folder;
inlined, it is rewritten relative to the outer document's folder, where the one document's paths resolve.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEPARATOR = "__"
_MAX_ALIAS_STEPS = 10_000  # template outputs that name template outputs: bounded by the nesting compile allows


@dataclass(frozen=True)
class _Written:
    """Text written in a template, with the template's folder: until it is known whether it lands in a file input."""

    text: str
    folder: Path


@dataclass
class _Inliner:
    """The state of one inlining: the nodes written so far, the ids taken and the template outputs' targets."""

    documents: Mapping[Path, dict[str, Any]]  # template file -> its parsed document
    references: Mapping[Path, Path]  # template path as written, joined to its folder -> the file
    list_params: frozenset[str]  # the outer document's list-typed params (a reference to one splices)
    top: Path  # the outer document's folder
    file_inputs: Callable[[str], Collection[str]]  # node type -> its inputs that name files
    nodes: dict[str, Any] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)
    aliases: dict[str, str] = field(default_factory=dict)  # "template_node.output" -> "inner_node.output"

    def level(self, document: dict[str, Any], base: Path, prefix: str,
              bindings: dict[str, Any] | None) -> dict[str, str]:
        """Add the nodes of one document level; `bindings` are a template's param values (None: the outer level).
        Returns the id each of its nodes was given."""
        entries = document.get("nodes", {})
        ids = {node_id: self._claim(prefix + node_id) for node_id in entries} if prefix else \
            {node_id: node_id for node_id in entries}
        for node_id, entry in entries.items():
            inputs = {name: self._value(value, ids, bindings, base) for name, value in entry.get("inputs", {}).items()}
            if "template" not in entry:
                files = self.file_inputs(str(entry.get("type")))
                self.nodes[ids[node_id]] = {**copy.deepcopy(entry), "inputs": {
                    name: self._settled(value, name in files) for name, value in inputs.items()}}
                continue
            path = self.references[base / str(entry["template"])]
            template = self.documents[path]
            inner = self.level(template, path.parent, ids[node_id] + SEPARATOR,
                               self._bindings(template, inputs, path.parent))
            for output, target in template.get("outputs", {}).items():
                node, _, made_by = target.partition(".")
                self.aliases[f"{ids[node_id]}.{output}"] = f"{inner[node]}.{made_by}"
        return ids

    def _claim(self, wanted: str) -> str:
        node_id, number = wanted, 1
        while node_id in self.taken:
            number += 1
            node_id = f"{wanted}-{number}"
        self.taken.add(node_id)
        return node_id

    def _bindings(self, template: dict[str, Any], inputs: dict[str, Any], folder: Path) -> dict[str, Any]:
        """A template's param values as compile gives them: what the node passed (a single item wrapped for a list
        param), else the default (written in the template, in `folder`)."""
        values: dict[str, Any] = {}
        for name, declaration in template.get("params", {}).items():
            if inputs.get(name) is not None:
                value = inputs[name]
                values[name] = [value] if declaration.get("list") and not isinstance(value, list) \
                    and not self._list_reference(value) else value
            elif "default" in declaration:
                values[name] = _written(copy.deepcopy(declaration["default"]), folder)
        return values

    def _list_reference(self, value: Any) -> bool:
        return isinstance(value, dict) and value.get("param") in self.list_params

    def _value(self, value: Any, ids: dict[str, str], bindings: dict[str, Any] | None, base: Path) -> Any:
        if isinstance(value, list):
            items: list[Any] = []
            for item in value:  # a list param's items take its place in the list, as in compile
                spliced = self._value(item, ids, bindings, base)
                is_param = isinstance(item, dict) and "param" in item
                items.extend(spliced if is_param and isinstance(spliced, list) else [spliced])
            return items
        if isinstance(value, dict) and isinstance(value.get("from"), str):
            node, dot, output = value["from"].partition(".")
            return {"from": f"{ids.get(node, node)}{dot}{output}"}
        if isinstance(value, dict) and isinstance(value.get("param"), str) and bindings is not None:
            return copy.deepcopy(bindings[value["param"]])
        return _written(copy.deepcopy(value), base) if bindings is not None else copy.deepcopy(value)

    def _settled(self, value: Any, file: bool) -> Any:
        """`value` without its _Written marks; a relative path of a file input rebased onto the outer folder."""
        if isinstance(value, list):
            return [self._settled(item, file) for item in value]
        if not isinstance(value, _Written):
            return value
        if not file or not value.text.strip() or Path(value.text).is_absolute() or value.folder == self.top:
            return value.text
        try:
            return Path(os.path.relpath(value.folder / value.text, self.top)).as_posix()
        except ValueError:  # another drive (Windows): no relative path leads there
            return str(value.folder / value.text)

    def resolve(self, value: Any) -> Any:
        """`value` with every link to a template node's output redirected to the inner node that makes it."""
        if isinstance(value, list):
            return [self.resolve(item) for item in value]
        if isinstance(value, dict) and isinstance(value.get("from"), str):
            return {"from": self.target(value["from"])}
        return value

    def target(self, link: str) -> str:
        for _ in range(_MAX_ALIAS_STEPS):
            if link not in self.aliases:
                return link
            link = self.aliases[link]
        raise ValueError(f"template outputs lead to each other without end at {link}")


def _written(value: Any, folder: Path) -> Any:
    """`value` with each text in it marked as written in `folder`."""
    if isinstance(value, list):
        return [_written(item, folder) for item in value]
    return _Written(value, folder) if isinstance(value, str) else value


def inline_templates(document: dict[str, Any], base_dir: Path, documents: Mapping[Path, dict[str, Any]],
                     references: Mapping[Path, Path],
                     file_inputs: Callable[[str], Collection[str]] = lambda node_type: ()) -> dict[str, Any]:
    """The equivalent document without template nodes, for a document that compiled (see CompiledGraph's
    template_documents and template_references; `file_inputs` names each node type's file inputs); a document
    without templates comes back equal."""
    nodes = document.get("nodes")
    if not isinstance(nodes, dict) or not any(isinstance(entry, dict) and "template" in entry
                                              for entry in nodes.values()):
        return document
    params = document.get("params", {})
    list_params = frozenset(name for name, declaration in params.items()
                            if isinstance(declaration, dict) and declaration.get("list"))
    inliner = _Inliner(documents, references, list_params, base_dir, file_inputs)
    inliner.taken.update(nodes)
    inliner.level(document, base_dir, "", None)
    inlined = {key: value for key, value in document.items() if key not in ("nodes", "outputs")}
    inlined["nodes"] = {node_id: {**entry, "inputs": {name: inliner.resolve(value)
                                                      for name, value in entry["inputs"].items()}}
                        for node_id, entry in inliner.nodes.items()}
    if "outputs" in document:
        inlined["outputs"] = {name: inliner.target(target) for name, target in document["outputs"].items()}
    return inlined
