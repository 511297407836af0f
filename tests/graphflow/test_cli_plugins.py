"""Plugins that just work, through the real `graphflow` console script: `--plugin` finds a module in the current
directory and works after the command name too, a module without NODES is refused by name, `--debug` shows a
failing node's traceback, and the built-in nodes stay when the current directory is a ComfyUI checkout (whose
top-level nodes.py would otherwise be imported in their place)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GRAPHFLOW = Path(sys.executable).with_name("graphflow")  # the console script pip installed beside this Python

PLUGIN = '''\
from graphflow import Input, Node, Output


class Shout(Node):
    """Upper-case text."""

    inputs = (Input("text", "STRING", "What to shout."),)
    outputs = (Output("text", "STRING", "The text, upper-cased."),)

    def run(self, ctx, text):
        if text == "fail":
            return {"text": helper_that_divides(text)}
        return {"text": text.upper()}


def helper_that_divides(text):
    return {"text": len(text) / 0}


NODES = (Shout,)
'''
COMFY_NODES = '''\
"""Stands for ComfyUI's nodes.py: node classes in NODE_CLASS_MAPPINGS, no NODES."""
NODE_CLASS_MAPPINGS = {"KSampler": object}
'''


@pytest.fixture
def comfy_checkout(tmp_path: Path) -> Path:
    """A current directory as a ComfyUI user has it: nodes.py at the top, a plugin module beside it, a graph using
    the plugin's node and a built-in one."""
    (tmp_path / "nodes.py").write_text(COMFY_NODES)
    (tmp_path / "shout_nodes.py").write_text(PLUGIN)
    (tmp_path / "no_list.py").write_text(PLUGIN.replace("NODES = (Shout,)\n", ""))
    graph = {"graphflow": 1, "params": {"text": {"type": "STRING", "default": "hi"}}, "nodes": {
        "s": {"type": "Shout", "inputs": {"text": {"param": "text"}}},
        "join": {"type": "JoinText", "inputs": {"texts": [{"from": "s.text"}, "there"], "separator": " "}}},
        "outputs": {"text": "join.text"}}
    (tmp_path / "g.json").write_text(json.dumps(graph))
    return tmp_path


def graphflow(args: list[str], cwd: Path, *, command: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([*(command or [str(GRAPHFLOW)]), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False, env={**env, "HF_HUB_OFFLINE": "1"})


def test_a_plugin_in_the_current_directory_works_before_or_after_the_command(comfy_checkout: Path) -> None:
    for args in (["--plugin", "shout_nodes", "run", "g.json", "--quiet"],
                 ["run", "g.json", "--quiet", "--plugin", "shout_nodes"]):
        done = graphflow(args, comfy_checkout)
        assert done.returncode == 0, done.stderr
        assert "text = 'HI there'" in done.stdout


def test_the_builtin_nodes_load_beside_a_comfyui_nodes_py(comfy_checkout: Path) -> None:
    listed = graphflow(["nodes", "--json", "--plugin", "shout_nodes"], comfy_checkout)
    assert listed.returncode == 0, listed.stderr
    names = {node["type"] for node in json.loads(listed.stdout)}
    assert {"Shout", "LoadImage", "Sampler", "JoinText"} <= names
    # `python -m` puts the current directory first on sys.path: the built-ins still come from graphflow's install
    module = graphflow(["nodes", "--json"], comfy_checkout, command=[sys.executable, "-m", "graphflow.cli"])
    assert module.returncode == 0, module.stderr
    assert "LoadImage" in {node["type"] for node in json.loads(module.stdout)}


def test_an_entry_point_resolving_to_the_wrong_module_fails_loudly(comfy_checkout: Path) -> None:
    script = "import sys, nodes; from graphflow.cli import main; sys.exit(main(['nodes']))"  # ComfyUI's, first
    done = graphflow(["-c", script], comfy_checkout, command=[sys.executable])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (f"error: the graphflow.nodes entry point builtin = 'nodes' resolved to {comfy_checkout / 'nodes.py'}, "
            "which declares no NODES: another module named 'nodes' is imported in its place") in done.stderr


def test_a_plugin_without_nodes_is_refused_by_name(comfy_checkout: Path) -> None:
    done = graphflow(["nodes", "--plugin", "no_list"], comfy_checkout)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: plugin module 'no_list' ({comfy_checkout / 'no_list.py'}) declares no "
                                  "NODES: list its node classes in it, as NODES = (MyNode, ...)")


def test_debug_shows_the_failing_nodes_traceback(comfy_checkout: Path) -> None:
    args = ["run", "g.json", "--quiet", "--plugin", "shout_nodes", "--set", "text=fail"]
    plain = graphflow(args, comfy_checkout)
    assert plain.returncode == 3 and "Traceback" not in plain.stderr
    assert "node 's' (Shout) failed: ZeroDivisionError: division by zero" in plain.stderr
    debug = graphflow([*args, "--debug"], comfy_checkout)
    assert debug.returncode == 3 and "Traceback (most recent call last)" in debug.stderr
    assert "shout_nodes.py" in debug.stderr and "in helper_that_divides" in debug.stderr
    assert "ZeroDivisionError: division by zero" in debug.stderr.splitlines()[-1]
