"""The node registry: built-in nodes through the entry point, plugin modules, clashes, and a light import."""

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import nodes
from graphflow import Node, NodeRegistry, default_registry
from graphflow.registry import ENTRY_POINT_GROUP, RegistryError
from nodes import Canny, Int

PLUGIN = """\
from graphflow.node import Input, Node, Output
from graphflow.types import IMAGE, INT


class Posterize(Node):
    \"\"\"Reduce each channel to a few levels.\"\"\"

    inputs = (Input("image", IMAGE), Input("levels", INT, default=4, min=2, max=256))
    outputs = (Output("image", IMAGE),)

    def run(self, ctx, image, levels):
        return {"image": (image * (levels - 1)).round() / (levels - 1)}
"""
LISTED = PLUGIN + "\n\nNODES = (Posterize,)\n"


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")


def test_builtin_nodes_are_found_through_the_entry_point() -> None:
    registry = default_registry()

    assert "nodes" in [entry.value for entry in entry_points(group=ENTRY_POINT_GROUP)]
    assert {"LoadImage", "LoadMask", "SaveImage", "ResizePad", "Canny", "Math", "Int", "Float", "String", "Bool",
            "MaskBlend", "FeatherMask", "GrowMask", "InvertMask"} <= set(registry.names())
    assert registry.get("Canny") is Canny
    assert set(nodes.NODES) <= set(registry)


def test_registry_lists_nodes_by_name() -> None:
    registry = default_registry()

    assert registry.names() == sorted(registry.names())
    assert [node.type_name for node in registry] == registry.names()
    assert len(registry) == len(registry.names())
    assert "Canny" in registry and "Cany" not in registry
    assert registry.get("Cany") is None


def test_plugin_module_registers_its_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "posterize_plugin", LISTED)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = NodeRegistry()

    registry.load_module("posterize_plugin")

    assert registry.names() == ["Posterize"]
    posterize = registry.get("Posterize")
    assert posterize is not None and posterize.input_map["levels"].default == 4


def test_default_registry_adds_named_plugins_to_the_builtin_nodes(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "posterize_plugin_2", LISTED)
    monkeypatch.syspath_prepend(str(tmp_path))

    registry = default_registry(["posterize_plugin_2"])

    assert "Posterize" in registry and "Canny" in registry


def test_plugin_nodes_list_restricts_what_is_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    helper = '\n\nclass PosterizeBase(Node):\n    """A base class, not a node."""\n\n\nNODES = (Posterize,)\n'
    write_module(tmp_path, "listed_plugin", PLUGIN + helper)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = NodeRegistry()

    registry.load_module("listed_plugin")

    assert registry.names() == ["Posterize"]


def test_plugin_without_nodes_list_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "reexporting_plugin", "from nodes.primitives import Int\n\n" + PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = NodeRegistry()

    with pytest.raises(RegistryError, match=r"plugin module 'reexporting_plugin' \(.*reexporting_plugin.py\) "
                                            r"declares no NODES: list its node classes in it, as NODES = "):
        registry.load_module("reexporting_plugin")
    assert len(registry) == 0


def test_missing_plugin_module_is_a_registry_error() -> None:
    with pytest.raises(RegistryError, match="no_such_graphflow_plugin"):
        NodeRegistry().load_module("no_such_graphflow_plugin")


def test_duplicate_type_name_from_a_different_class_is_rejected() -> None:
    registry = NodeRegistry([Int])

    class Impostor(Node):
        type_name = "Int"

    with pytest.raises(RegistryError, match="'Int'"):
        registry.register(Impostor)
    assert registry.get("Int") is Int


def test_plugin_clashing_with_a_builtin_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "clashing_plugin", LISTED.replace("class Posterize(Node):",
                                                             "class Posterize(Node):\n    type_name = \"Canny\""))
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(RegistryError, match="Canny"):
        default_registry(["clashing_plugin"])


def test_registering_the_same_class_twice_is_harmless() -> None:
    registry = NodeRegistry([Int, Int])
    registry.register(Int)

    assert registry.names() == ["Int"]


def test_importing_graphflow_and_building_the_registry_imports_no_heavy_library() -> None:
    check = (
        "import sys, graphflow\n"
        "from graphflow.schema import document_schema\n"
        "from graphflow.validation import validate_document\n"
        "registry = graphflow.default_registry()\n"
        "document_schema(registry)\n"
        "assert 'Canny' in registry\n"
        "print(sorted(name for name in ('torch', 'diffusers', 'transformers', 'cv2') if name in sys.modules))\n"
    )

    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, check=False)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
