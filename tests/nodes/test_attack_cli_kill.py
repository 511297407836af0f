"""kill -9 under the real `graphflow run` at the moment a PNG or a disk-cache entry is being written, then a second
run: are the leftovers gone, are the results right?"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOM = Path(__file__).resolve().parents[2] / "graphs" / "assets" / "room.png"
LINUX = sys.platform.startswith("linux")

# Nodes for the kill tests: a batch of two images, and (with KILL_AT=".png:2") a SIGKILL of the whole process at the
# fsync of the 2nd temporary file whose target ends in ".png" -- a file fully written, not yet in place.
PLUGIN = textwrap.dedent('''
    import os
    import signal

    from graphflow import Input, Node, Output


    class Twice(Node):
        inputs = (Input("image", "IMAGE"),)
        outputs = (Output("image", "IMAGE"),)

        def run(self, ctx, image):
            import torch

            return {"image": torch.cat([image, 1 - image])}


    NODES = (Twice,)

    if os.environ.get("KILL_AT"):
        suffix, count = os.environ["KILL_AT"].split(":")
        seen, real_fsync = [], os.fsync

        def fsync(fd):
            name = os.readlink(f"/proc/self/fd/{fd}")
            if name.endswith(".tmp") and suffix + "." in name:
                seen.append(name)
                if len(seen) == int(count):
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_fsync(fd)

        os.fsync = fsync
''')
BATCH = {"graphflow": 1, "nodes": {
    "photo": {"type": "LoadImage", "inputs": {"path": "room.png"}},
    "edges": {"type": "Canny", "inputs": {"image": {"from": "photo.image"}}},
    "twice": {"type": "Twice", "inputs": {"image": {"from": "edges.image"}}},
    "save": {"type": "SaveImage", "inputs": {"image": {"from": "twice.image"}, "prefix": "b"}}}}


def graphflow(args: list[str], cwd: Path, *, preexec_fn: object = None, timeout: float = 120,
              **env: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join([str(cwd), *(entry for entry in sys.path if entry)])
    return subprocess.run([sys.executable, "-m", "graphflow.cli", "--plugin", "killer", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False, preexec_fn=preexec_fn,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **env})


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    shutil.copy(ROOM, tmp_path / "room.png")
    (tmp_path / "killer.py").write_text(PLUGIN)
    (tmp_path / "g.json").write_text(json.dumps(BATCH))
    return tmp_path


def temporary_files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob(".*.tmp"))


def pngs(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("*.png"))


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/fd")
def test_kill_9_in_the_middle_of_a_batch_leaves_no_image_of_it(workspace: Path) -> None:
    killed = graphflow(["run", "g.json", "--quiet"], workspace, KILL_AT=".png:2")
    assert killed.returncode == -9

    again = graphflow(["run", "g.json", "--quiet"], workspace)

    assert again.returncode == 0, again.stderr
    assert temporary_files(workspace / "output") == []  # the killed write's temporary file is gone
    assert pngs(workspace / "output") == ["b_00000.png", "b_00001.png"]  # only the batch that finished


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/fd")
def test_kill_9_while_a_disk_cache_entry_is_written_heals_on_the_next_run(workspace: Path) -> None:
    killed = graphflow(["run", "g.json", "--quiet", "--cache-dir", "cache"], workspace, KILL_AT=".safetensors:1")
    assert killed.returncode == -9 and len(temporary_files(workspace / "cache")) == 1

    again = graphflow(["run", "g.json", "--quiet", "--cache-dir", "cache"], workspace)  # computes all: the oracle
    third = graphflow(["run", "g.json", "--quiet", "--cache-dir", "cache", "--out", "third"], workspace)

    assert again.returncode == 0 and third.returncode == 0, again.stderr + third.stderr
    assert temporary_files(workspace / "cache") == [] and len(list((workspace / "cache").rglob("*.safetensors"))) == 1
    assert "ran 4 nodes, 0 from cache" in again.stdout and "ran 2 nodes, 1 from cache" in third.stdout  # edges
    assert pngs(workspace / "output") == pngs(workspace / "third") == ["b_00000.png", "b_00001.png"]
    for name in pngs(workspace / "third"):
        assert np.array_equal(np.asarray(Image.open(workspace / "third" / name)),
                              np.asarray(Image.open(workspace / "output" / name)))
