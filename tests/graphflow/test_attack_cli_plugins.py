"""`--plugin` abuse through the real command: plugin modules whose NODES or node declarations are broken must be
refused by name (exit 1, "error: ..."), or (an odd default) listed; never a traceback, in `graphflow nodes`,
`nodes --json` and `schema`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGINS = {
    "nodes_not_a_list": "NODES = 5\n",
    "nodes_generator_raises": textwrap.dedent('''
        def declared():
            raise ValueError("boom")
            yield
        NODES = declared()
    '''),
    "unhashable_type_name": textwrap.dedent('''
        from graphflow.node import Node
        class Broken(Node):
            type_name = ["not", "a", "name"]
    '''),
    "default_not_json": textwrap.dedent('''
        from graphflow.node import Input, Node, Output
        class OddDefault(Node):
            inputs = (Input("x", "STRING", default=object()),)
            outputs = (Output("y", "STRING"),)
    '''),
    # refused by name already: kept as regressions
    "clashing_type": "from graphflow.node import Node\nclass LoadImage(Node):\n    pass\n",
    "fails_on_import": "raise RuntimeError('plugin bug')\n",
    "lists_a_non_node": "NODES = [None]\n",
}
CASES = list(PLUGINS)


@pytest.mark.parametrize("plugin", CASES)
def test_a_broken_plugin_is_a_named_error_in_every_listing_command(tmp_path: Path, plugin: str) -> None:
    (tmp_path / f"{plugin}.py").write_text(PLUGINS[plugin])
    path = os.pathsep.join([str(tmp_path), *(entry for entry in sys.path if entry)])
    for command in (["nodes"], ["nodes", "--json"], ["schema"]):
        done = subprocess.run([sys.executable, "-m", "graphflow.cli", "--plugin", plugin, *command], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path})
        assert "Traceback" not in done.stderr, (command, done.stderr[-800:])
        refused = done.returncode == 1 and done.stderr.startswith("error: ")
        assert refused or plugin not in ("nodes_not_a_list", "nodes_generator_raises", "unhashable_type_name",
                                         "clashing_type", "fails_on_import", "lists_a_non_node"), done.stderr
        assert refused or done.returncode == 0, (command, done.stderr[-800:])
