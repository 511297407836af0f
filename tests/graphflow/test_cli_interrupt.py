"""`graphflow run` stopped by Ctrl-C tells the truth about the files on disk, and bad --input-dir / --out /
--max-image-pixels values are usage errors (exit 2), never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from graphflow.cli import main

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"

PLUGIN = textwrap.dedent('''
    """Nodes that let a test interrupt a run at a known moment: each touches ./ready, then waits for the signal."""
    import os
    import time
    from pathlib import Path

    import nodes.image
    from graphflow import Input, Node, Output


    def wait_for_the_signal():
        Path("ready").touch()
        time.sleep(120)


    class Twice(Node):
        """The image and its negative, as a batch of two."""

        inputs = (Input("image", "IMAGE"),)
        outputs = (Output("image", "IMAGE"),)

        def run(self, ctx, image):
            import torch

            return {"image": torch.cat([image, 1 - image])}


    class Wait(Node):
        """Wait for the signal after the files it is given were written."""

        is_output = True
        inputs = (Input("paths", "PATHS"),)
        outputs = (Output("paths", "PATHS"),)

        def run(self, ctx, paths):
            wait_for_the_signal()
            return {"paths": paths}


    NODES = (Twice, Wait)

    if os.environ.get("WAIT_BEFORE_THE_SECOND_WRITE"):
        real_place, calls = nodes.image.Staged.place, []

        def second_place_waits(self, path, **options):
            calls.append(path)
            if len(calls) == 2:
                wait_for_the_signal()
            return real_place(self, path, **options)

        nodes.image.Staged.place = second_place_waits
''')


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(GRAPHS, tmp_path / "graphs")
    (tmp_path / "interrupt_nodes.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_graph(workspace: Path, nodes: dict[str, dict[str, object]]) -> str:
    photo = {"photo": {"type": "LoadImage", "inputs": {"path": "graphs/assets/room.png"}}}
    (workspace / "g.json").write_text(json.dumps({"graphflow": 1, "nodes": photo | nodes}))
    return "g.json"


def interrupted_run(workspace: Path, graph: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`graphflow run` in a child process, sent SIGINT once a plugin node touches ./ready."""
    path = os.pathsep.join([str(workspace), *(entry for entry in sys.path if entry)])
    command = [sys.executable, "-m", "graphflow.cli", "--plugin", "interrupt_nodes", "run", graph, "--quiet"]
    # a shell that starts jobs in the background makes them ignore SIGINT; the child must not inherit that
    child = subprocess.Popen(command, cwd=workspace, env={**os.environ, "PYTHONPATH": path, **env},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 90
    while not (workspace / "ready").exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the run ended before the interrupt: {child.communicate()}")
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=60)
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


def output_files(workspace: Path) -> list[str]:
    return sorted(entry.name for entry in (workspace / "output").iterdir()) if (workspace / "output").is_dir() else []


def test_an_interrupt_after_a_save_names_the_files_that_stay(workspace: Path) -> None:
    graph = write_graph(workspace, {
        "save": {"type": "SaveImage", "inputs": {"image": {"from": "photo.image"}, "prefix": "first"}},
        "wait": {"type": "Wait", "inputs": {"paths": {"from": "save.paths"}}}})

    done = interrupted_run(workspace, graph)

    assert done.returncode == 130, done.stderr
    written = workspace / "output" / "first_00000.png"
    assert done.stderr.strip().splitlines() == [
        "interrupted; these files were finished before it and stay:", f"  wrote {written}", "no partial file remains"]
    assert output_files(workspace) == ["first_00000.png"]


def test_an_interrupt_between_two_images_of_a_batch_leaves_no_file_and_says_so(workspace: Path) -> None:
    graph = write_graph(workspace, {
        "twice": {"type": "Twice", "inputs": {"image": {"from": "photo.image"}}},
        "save": {"type": "SaveImage", "inputs": {"image": {"from": "twice.image"}, "prefix": "batch"}}})

    done = interrupted_run(workspace, graph, WAIT_BEFORE_THE_SECOND_WRITE="1")

    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "interrupted: no file was written, and nothing partial remains"
    assert output_files(workspace) == []  # neither the first image nor a temporary file


@pytest.mark.parametrize("option, value, problem", [
    ("--input-dir", "loop", "loop is not a usable path (Symlink loop from"),
    ("--input-dir", "a_file", "a_file is a file, not a directory"),
    ("--input-dir", "missing", "missing does not exist"),
    ("--out", "loop", "loop is not a usable path (Symlink loop from"),
    ("--out", "loop/sub", "loop/sub is not a usable path (Symlink loop from"),
    ("--out", "a_file", "a_file cannot be made: {workspace}/a_file is a file, not a directory"),
    ("--out", "a_file/sub", "a_file/sub cannot be made: {workspace}/a_file is a file, not a directory"),
])
def test_a_bad_input_or_output_directory_is_a_usage_error(workspace: Path, capsys: pytest.CaptureFixture[str],
                                                          option: str, value: str, problem: str) -> None:
    (workspace / "loop").symlink_to("loop")
    (workspace / "a_file").write_text("not a directory")

    with pytest.raises(SystemExit) as exited:
        main(["run", "graphs/canny_blend.json", option, value, "--quiet"])

    assert exited.value.code == 2
    assert f"error: argument {option}: {problem.format(workspace=workspace)}" in capsys.readouterr().err
    assert not (workspace / "output").exists()


@pytest.mark.parametrize("option, problem", [("--input-dir", "locked cannot be read (permission denied)"),
                                             ("--out", "is not writable (permission denied)")])
def test_a_directory_without_permission_is_a_usage_error(workspace: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch, option: str,
                                                         problem: str) -> None:
    (workspace / "locked").mkdir()
    real_access = os.access
    # chmod cannot lock root out, and the tests may run as root: the permission check is what is simulated
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "locked" and real_access(path, mode))

    with pytest.raises(SystemExit) as exited:
        main(["run", "graphs/canny_blend.json", option, "locked", "--quiet"])

    assert exited.value.code == 2 and problem in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes every directory")
@pytest.mark.parametrize("option", ["--input-dir", "--out"])
def test_a_directory_chmod_000_is_a_usage_error(workspace: Path, capsys: pytest.CaptureFixture[str],
                                                option: str) -> None:
    (workspace / "locked").mkdir(mode=0)

    with pytest.raises(SystemExit) as exited:
        main(["run", "graphs/canny_blend.json", option, "locked", "--quiet"])

    assert exited.value.code == 2 and "permission denied" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_max_image_pixels_must_be_a_positive_number(workspace: Path, capsys: pytest.CaptureFixture[str],
                                                    value: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "graphs/canny_blend.json", "--max-image-pixels", value])

    assert exited.value.code == 2 and "argument --max-image-pixels: expected a" in capsys.readouterr().err


def test_max_image_pixels_refuses_bigger_inputs_by_name(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "graphs/canny_blend.json", "--max-image-pixels", "12287", "--quiet"]) == 3
    assert ("node 'photo' (LoadImage) failed: NodeInputError: assets/room.png: it is 128 x 96 = 12,288 "
            "pixels, more than the limit of 12,287 pixels") in capsys.readouterr().err
    assert main(["run", "graphs/canny_blend.json", "--max-image-pixels", "12288", "--quiet"]) == 0
