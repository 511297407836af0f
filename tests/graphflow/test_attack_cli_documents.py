"""Hostile documents and hostile surroundings for the real `graphflow` command, run in subprocesses: template fan-out,
FIFOs and devices where documents, templates and images belong, odd characters in output names and params, a
stdout that cannot be written, and Ctrl-C while the command is still starting. Each must end in a clear error
(a code, the node, the input) or a success, never a traceback or a hang."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOM = Path(__file__).resolve().parents[2] / "graphs" / "assets" / "room.png"


def graphflow(args: list[str], cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m graphflow.cli ARGS` in `cwd`, offline."""
    return subprocess.run([sys.executable, "-m", "graphflow.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, check=False)


def write(path: Path, document: dict[str, object]) -> Path:
    path.write_text(json.dumps(document))
    return path


def test_a_template_fan_out_bomb_is_refused_quickly(tmp_path: Path) -> None:
    write(tmp_path / "t0.json", {"graphflow": 1, "nodes": {"a": {"type": "Int", "inputs": {"value": 1}}},
                                 "outputs": {"v": "a.value"}})
    for level in range(1, 7):  # t6 expands to 10**6 Int nodes (t5, 10**5 of them, already takes ~14 s)
        write(tmp_path / f"t{level}.json", {"graphflow": 1, "outputs": {"v": "n0.v"},
                                            "nodes": {f"n{i}": {"template": f"t{level - 1}.json"} for i in range(10)}})
    try:
        done = graphflow(["validate", "t6.json"], tmp_path, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("graphflow validate t6.json did not finish within 10 s")
    assert done.returncode == 1 and "Traceback" not in done.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_and_devices_as_document_template_or_image_are_named_errors(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.json")
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    write(tmp_path / "uses.json", {"graphflow": 1, "nodes": {
        "t": {"template": "fifo.json"},
        "a": {"type": "LoadImage", "inputs": {"path": "fifo.png"}},
        "b": {"type": "LoadImage", "inputs": {"path": "zero.png"}}}, "outputs": {"a": "a.image", "b": "b.image"}})

    document = graphflow(["validate", "fifo.json"], tmp_path, timeout=30)
    template = graphflow(["validate", "uses.json"], tmp_path, timeout=30)
    write(tmp_path / "uses.json", {"graphflow": 1, "nodes": {
        "a": {"type": "LoadImage", "inputs": {"path": "fifo.png"}},
        "b": {"type": "LoadImage", "inputs": {"path": "zero.png"}}}, "outputs": {"a": "a.image", "b": "b.image"}})
    images = graphflow(["run", "uses.json", "--quiet", "--input-dir", ".", "--input-dir", "/dev"], tmp_path, timeout=60)

    assert document.returncode == 1 and "[file_not_found]" in document.stdout and "it is a FIFO" in document.stdout
    assert template.returncode == 1 and "[template_not_found] node 't', input 'template'" in template.stdout
    assert images.returncode == 1 and "Traceback" not in images.stderr
    assert "[file_not_found] node 'a', input 'path'" in images.stderr and "is a FIFO, not a file" in images.stderr
    assert "[file_not_found] node 'b', input 'path'" in images.stderr
    assert "/dev/zero is a character device" in images.stderr


def test_output_names_from_a_document_print_safely_in_the_run_summary(tmp_path: Path) -> None:
    write(tmp_path / "g.json", {"graphflow": 1, "nodes": {"a": {"type": "Int", "inputs": {"value": 1}}},
                                "outputs": {"\x1b[2J\x1b[31mred\nwrote /etc/passwd": "a.value"}})

    done = graphflow(["run", "g.json", "--quiet"], tmp_path)

    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout
    assert len(done.stdout.splitlines()) == 2  # "ran 1 node ..." and one line for the one output


def test_a_lone_surrogate_in_a_param_is_refused_up_front_or_saved(tmp_path: Path) -> None:
    shutil.copy(ROOM, tmp_path / "room.png")
    write(tmp_path / "g.json", {
        "graphflow": 1, "params": {"note": {"type": "STRING", "default": "caf\ud800"}},
        "nodes": {"photo": {"type": "LoadImage", "inputs": {"path": "room.png"}},
                  "note": {"type": "String", "inputs": {"value": {"param": "note"}}},
                  "save": {"type": "SaveImage", "inputs": {"image": {"from": "photo.image"}, "prefix": "p"}}},
        "outputs": {"note": "note.value"}})

    done = graphflow(["run", "g.json", "--quiet"], tmp_path, timeout=120)

    assert "UnicodeEncodeError" not in done.stderr, done.stderr
    assert done.returncode == 0 or (done.returncode == 1 and "[invalid_value]" in done.stderr)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_stdout_that_cannot_be_written_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    write(tmp_path / "g.json", {"graphflow": 1, "nodes": {"a": {"type": "Int", "inputs": {"value": 1}}},
                                "outputs": {"v": "a.value"}})
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "graphflow.cli", "validate", "g.json"], cwd=tmp_path,
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr


SITECUSTOMIZE = textwrap.dedent('''
    """Ctrl-C at a known moment of start-up: while graphflow imports its document module."""
    import sys

    class CtrlC:
        def find_spec(self, name, path=None, target=None):
            if name == "graphflow.document":
                raise KeyboardInterrupt
            return None

    sys.meta_path.insert(0, CtrlC())
''')


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    write(tmp_path / "g.json", {"graphflow": 1, "nodes": {"a": {"type": "Int", "inputs": {"value": 1}}},
                                "outputs": {"v": "a.value"}})
    path = os.pathsep.join([str(tmp_path), *(entry for entry in sys.path if entry)])

    done = graphflow(["validate", "g.json"], tmp_path, PYTHONPATH=path)

    assert "Traceback" not in done.stderr and done.returncode == 130, done.stderr
