"""The node registry: every node type a document may name, found through plugins.

Built-in nodes are a plugin like any other: a module listed under the `graphflow.nodes` entry
point (or passed with `--plugin module`) whose `NODES` sequence names its node classes.

An installed plugin is imported from where it is installed, never from the current directory: a
ComfyUI checkout has a top-level `nodes.py`, which a plain `import nodes` run there would find
before graphflow's own `nodes` package. A `--plugin` module that is not installed is looked for in
the current directory too.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from importlib.machinery import ModuleSpec, PathFinder
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType

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

    def load_module(self, module_name: str, *, entry: EntryPoint | None = None) -> None:
        """Register the node classes a plugin module lists in `NODES` (the entry point it was named by, if any)."""
        try:
            module = _import_installed(module_name) if entry is not None else _import_plugin(module_name)
        except Exception as error:  # a plugin's own bug must not look like graphflow's
            raise RegistryError(f"cannot import plugin module {module_name!r}: "
                                f"{type(error).__name__}: {error}") from error
        declared = getattr(module, "NODES", None)
        if declared is None:
            raise RegistryError(_no_nodes(module_name, module, entry))
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
            self.load_module(entry.value, entry=entry)

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


_IMPORT_LOCK = threading.Lock()  # a top-level module imported by hand below is executed once


def _import_installed(module_name: str) -> ModuleType:
    """Import `module_name` as installed: its top-level package is searched for everywhere but the current
    directory (for a top-level package not imported yet)."""
    top = module_name.partition(".")[0]
    with _IMPORT_LOCK:
        if top not in sys.modules:
            spec = _find_spec(top, [entry for entry in sys.path if not _is_current_directory(entry)], meta=True)
            if spec is not None:
                _execute(top, spec)
    return importlib.import_module(module_name)


def _import_plugin(module_name: str) -> ModuleType:
    """Import a `--plugin` module: as Python would, else from the current directory (where the console script,
    unlike `python -m`, does not look)."""
    top = module_name.partition(".")[0]
    with _IMPORT_LOCK:
        if top not in sys.modules and importlib.util.find_spec(top) is None:
            spec = _find_spec(top, [os.getcwd()], meta=False)
            if spec is not None:
                _execute(top, spec)
    return importlib.import_module(module_name)


def _find_spec(name: str, path: list[str], *, meta: bool) -> ModuleSpec | None:
    """The spec of top-level module `name` from `path`, then (with `meta`) from the other finders (such as an
    editable install's), in import order."""
    finders = sys.meta_path if meta else [PathFinder]
    for finder in finders:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        spec = PathFinder.find_spec(name, path) if finder is PathFinder else find(name, None)
        if spec is not None:
            return spec
    return None


def _execute(name: str, spec: ModuleSpec) -> None:
    if spec.loader is None:  # a namespace package: nothing to execute, and no NODES
        raise ImportError(f"{name} is a folder without __init__.py, not a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def _is_current_directory(entry: str) -> bool:
    try:
        return os.path.samefile(entry or ".", ".")
    except OSError:
        return False


def _no_nodes(module_name: str, module: ModuleType, entry: EntryPoint | None) -> str:
    where = getattr(module, "__file__", None) or "(no file)"
    if entry is None:
        return (f"plugin module {module_name!r} ({where}) declares no NODES: list its node classes in it, "
                "as NODES = (MyNode, ...)")
    return (f"the {ENTRY_POINT_GROUP} entry point {entry.name} = {entry.value!r} resolved to {where}, which declares "
            f"no NODES: another module named {module_name!r} is imported in its place (a ComfyUI checkout's "
            "nodes.py, say); graphflow's own nodes are not loaded, so nothing would run as written")


def default_registry(plugins: Iterable[str] = ()) -> NodeRegistry:
    """A registry with every installed plugin plus the named extra plugin modules."""
    registry = NodeRegistry()
    registry.load_entry_points()
    for module_name in plugins:
        registry.load_module(module_name)
    return registry
