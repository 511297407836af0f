"""CLI manners: --version, `python -m graphflow`, one set of exit codes for run and sweep (documented in --help),
a bar only on a terminal and a line per node in logs, `graphflow nodes NAME`, help text on every option, and a
sampler step count that matches the steps that run."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from graphflow import Engine, Graph, __version__
from graphflow.cli import EXIT_CODES, command_parser, main
from graphflow.events import NodeProgress
from nodes import CheckpointLoader, LoadImage, Sampler, TextEncode, VAEEncode

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = '''\
from graphflow import Input, Node, Output


class Stop(Node):
    """Fails (how) when asked to."""

    inputs = (Input("how", "STRING", "'ok', 'raise' or 'interrupt'.", choices=("ok", "raise", "interrupt")),)
    outputs = (Output("text", "STRING", "The input, when it did not fail."),)

    def run(self, ctx, how):
        if how == "raise":
            raise ValueError("asked to fail")
        if how == "interrupt":
            raise KeyboardInterrupt
        return {"text": how}


NODES = (Stop,)
'''
TEMPLATE = {"graphflow": 1, "params": {"how": {"type": "STRING", "default": "ok"}}, "nodes": {
    "first": {"type": "Int", "inputs": {"value": 1}},
    "stop": {"type": "Stop", "inputs": {"how": {"param": "how"}}},
    "save": {"type": "JoinText", "inputs": {"texts": [{"from": "stop.text"}]}}},
    "outputs": {"text": "save.text", "n": "first.value"}}


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "stop_nodes.py").write_text(PLUGIN)
    (tmp_path / "t.json").write_text(json.dumps(TEMPLATE))
    (tmp_path / "bad.json").write_text(json.dumps({"graphflow": 1, "nodes": {"x": {"type": "Nope"}}}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_version_and_python_dash_m(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"graphflow {__version__}\n"
    done = subprocess.run([sys.executable, "-m", "graphflow", "nodes", "Canny", "--json"], capture_output=True,
                          text=True, timeout=60, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert [node["type"] for node in json.loads(done.stdout)] == ["Canny"]


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_run_and_sweep_share_the_exit_codes(workspace: Path, command: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    def exit_code(graph: str, how: str) -> int:
        values = ["--set", f"how={how}"] if command == "run" else ["--grid", f"how={how}", "--out", f"sweep_{how}"]
        return main([command, graph, "--plugin", "stop_nodes", "--quiet", *values])

    assert exit_code("t.json", "ok") == 0
    assert exit_code("bad.json", "ok") == 1  # an invalid document
    assert exit_code("t.json", "raise") == 3  # a node failed
    assert exit_code("t.json", "interrupt") == 130
    with pytest.raises(SystemExit) as usage:
        main([command, "t.json", "--no-such-option"])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert "failed: ValueError: asked to fail" in err and "interrupted" in err and "unrecognized arguments" in err


def test_help_documents_the_exit_codes_and_the_readme_agrees(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert EXIT_CODES in capsys.readouterr().out
    readme = (ROOT / "README.md").read_text()
    for code, meaning in (("0", "done"), ("1", "invalid document"), ("2", "usage error"), ("3", "node failed"),
                          ("130", "interrupted")):
        assert f"- `{code}` {meaning}" in readme, code


def test_every_option_of_every_command_has_help_text() -> None:
    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, sub in action.choices.items():
                    walk(sub, f"{name} {command}")
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(command_parser(), "graphflow")
    assert missing == []


def test_progress_is_a_line_per_node_in_a_log(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "t.json", "--plugin", "stop_nodes"]) == 0
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert [line.split(" ")[:2] for line in lines] == [["[1/3]", "first"], ["[2/3]", "stop"], ["[3/3]", "save"]]
    assert lines[1].startswith("[2/3] stop (Stop) ") and lines[1].endswith(" s") and "\r" not in err


def test_progress_is_a_bar_on_a_terminal(workspace: Path) -> None:
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm draws nothing in 0 columns
    running = subprocess.Popen([sys.executable, "-m", "graphflow", "run", "t.json", "--plugin", "stop_nodes"],
                               cwd=workspace, stderr=follower, stdout=subprocess.DEVNULL)
    os.close(follower)  # the child holds the terminal now: reading ends when it exits
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert running.wait(timeout=60) == 0
    assert b"\r" in shown and b"node" in shown and b"[1/3]" not in shown


def test_nodes_name_shows_one_node_and_suggests_on_a_typo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nodes", "Canny"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Canny (preprocess, v") and "    in  low: INT" in out and "LoadImage" not in out
    assert main(["nodes", "Cany"]) == 2
    assert "error: no node type named 'Cany'; did you mean 'Canny'?" in capsys.readouterr().err


@pytest.mark.parametrize("scheduler", ["euler", "heun", "pndm"])
def test_the_sampler_counts_the_steps_that_run_after_strength(scheduler: str, tiny_models: Path,
                                                              tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHFLOW_TINY_MODELS", str(tiny_models))
    graph = Graph("img2img")
    sd = graph.add(CheckpointLoader(model="tiny:sd15"), "sd")
    photo = graph.add(LoadImage(path=str(ROOT / "graphs" / "assets" / "room.png")), "photo")
    latent = graph.add(VAEEncode(vae=sd.vae, image=photo.image), "encode")
    text = graph.add(TextEncode(clip=sd.clip, text="a room"), "text")
    sampled = graph.add(Sampler(model=sd.model, positive=text.conditioning, latent=latent.latent, steps=6,
                                strength=0.5, scheduler=scheduler, seed=1), "sample")
    graph.output("latent", sampled.latent)
    events: list[NodeProgress] = []
    Engine(input_dirs=[ROOT], output_dir=tmp_path).run(graph, on_event=lambda event: events.append(event)
                                                       if isinstance(event, NodeProgress) else None)
    assert [(event.step, event.total) for event in events] == [(1, 3), (2, 3), (3, 3)]  # floor(0.5 * 6) steps
