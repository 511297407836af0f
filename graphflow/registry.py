"""The node registry: every node type a document may name, found through plugins.

Built-in nodes are a plugin like any other: a module listed under the `graphflow.nodes` entry
point (or passed with `--plugin module`) whose `NODES` sequence names its node classes.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from importlib.metadata import entry_points

from graphflow.errors import GraphflowError
from graphflow.node import Node, declared_as, run_signature_problems

ENTRY_POINT_GROUP = "graphflow.nodes"


class RegistryError(GraphflowError):
    """A plugin could not be loaded or declares a clashing node type."""


class NodeRegistry:
    """Node types by name."""

    def __init__(self, nodes: Iterable[type[Node]] = ()) -> None:
        self._nodes: dict[str, type[Node]] = {}
        for node in nodes:
            self.register(node)

    def register(self, node: type[Node]) -> type[Node]:
        problems = run_signature_problems(node)  # checked at declaration too, unless the class declared nothing
        if problems:
            raise RegistryError(f"{declared_as(node)} cannot be registered: " + "; ".join(problems))
        existing = self._nodes.get(node.type_name)
        if existing is not None and existing is not node:
            raise RegistryError(f"node type {node.type_name!r} is declared twice: "
                                f"{existing.__module__} and {node.__module__}")
        self._nodes[node.type_name] = node
        return node

    def load_module(self, module_name: str) -> None:
        """Register the node classes of a plugin module (its `NODES`, else every Node subclass in it)."""
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # a plugin's own bug must not look like graphflow's
            raise RegistryError(f"cannot import plugin module {module_name!r}: "
                                f"{type(error).__name__}: {error}") from error
        declared = getattr(module, "NODES", None)
        if declared is None:
            declared = [value for value in vars(module).values()
                        if isinstance(value, type) and issubclass(value, Node) and value.__module__ == module.__name__]
        try:
            nodes = list(declared)  # the plugin's own code may run here (a generator): its errors are its own
        except Exception as error:
            raise RegistryError(f"plugin module {module_name!r}: NODES is not a list of node classes "
                                f"({type(error).__name__}: {error})") from error
        for node in nodes:
            if not (isinstance(node, type) and issubclass(node, Node)):
                raise RegistryError(f"plugin module {module_name!r} lists {node!r} in NODES, which is not a Node class")
            self.register(node)

    def load_entry_points(self) -> None:
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            self.load_module(entry.value)

    def get(self, name: str) -> type[Node] | None:
        return self._nodes.get(name)

    def names(self) -> list[str]:
        return sorted(self._nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def __iter__(self) -> Iterator[type[Node]]:
        return iter(self._nodes[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._nodes)


def default_registry(plugins: Iterable[str] = ()) -> NodeRegistry:
    """A registry with every installed plugin plus the named extra plugin modules."""
    registry = NodeRegistry()
    registry.load_entry_points()
    for module_name in plugins:
        registry.load_module(module_name)
    return registry
