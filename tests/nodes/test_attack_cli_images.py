"""Hostile input files under the real `graphflow run`: a file far larger than memory, and images whose headers
understate the pixels they decode to. Each must be a named error of its node, never a traceback."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

LINUX = sys.platform.startswith("linux")


def graphflow(args: list[str], cwd: Path, *, preexec_fn: object = None, timeout: float = 120,
              **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "graphflow.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False, preexec_fn=preexec_fn,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return tmp_path


@pytest.mark.skipif(not LINUX, reason="sparse files and RLIMIT_AS")
def test_an_input_file_larger_than_memory_is_refused_by_name(workspace: Path) -> None:
    import resource

    with open(workspace / "huge.png", "wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n")
        file.truncate(6 << 30)  # sparse: 6 GiB that take no disk
    document = {"graphflow": 1, "nodes": {"photo": {"type": "LoadImage", "inputs": {"path": "huge.png"}}},
                "outputs": {"image": "photo.image"}}
    (workspace / "huge.json").write_text(json.dumps(document))

    def three_gib() -> None:  # memory this small machine may not have is simulated: an address-space limit
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    done = graphflow(["run", "huge.json", "--quiet"], workspace, preexec_fn=three_gib)

    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.returncode in (1, 3) and "'photo'" in done.stderr


def _gif_with_a_frame_larger_than_its_screen(side: int) -> bytes:
    screen = struct.pack("<HHBBB", 8, 8, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, side, side, 0) + b"\x02\x02\x4c\x01\x00"
    return b"GIF89a" + screen + frame + b";"


def _tiff_with_a_huge_tile(side: int) -> bytes:
    data = zlib.compress(b"\0" * 1000)
    tags = [(256, 4, 8), (257, 4, 8), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1), (284, 3, 1),
            (322, 4, side), (323, 4, side), (324, 4, 8), (325, 4, len(data))]
    padded = data + b"\0" * (len(data) & 1)
    out = b"II*\0" + struct.pack("<I", 8 + len(padded)) + padded + struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        out += struct.pack("<HHIHH", tag, kind, 1, value, 0) if kind == 3 else struct.pack("<HHII", tag, kind, 1, value)
    return out + b"\0\0\0\0"


@pytest.mark.parametrize("name, data", [
    ("frame.gif", _gif_with_a_frame_larger_than_its_screen(9000)),  # 8 x 8 screen, 81 Mpx frame
    ("tile.tif", _tiff_with_a_huge_tile(1 << 14)),  # 8 x 8 image in one 16384 x 16384 tile
], ids=["gif-frame-larger-than-screen", "tiff-huge-tile"])
def test_an_image_whose_header_understates_its_size_is_refused(workspace: Path, name: str, data: bytes) -> None:
    (workspace / name).write_bytes(data)
    document = {"graphflow": 1, "nodes": {"photo": {"type": "LoadImage", "inputs": {"path": name}}},
                "outputs": {"image": "photo.image"}}
    (workspace / "bomb.json").write_text(json.dumps(document))

    done = graphflow(["run", "bomb.json", "--quiet", "--max-image-pixels", "1000000"], workspace)

    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr[-600:]
    assert f"node 'photo' (LoadImage) failed: NodeInputError: {name}: " in done.stderr


def test_a_legal_long_output_name_is_written(workspace: Path) -> None:
    room = Path(__file__).resolve().parents[2] / "graphs" / "assets" / "room.png"
    (workspace / "room.png").write_bytes(room.read_bytes())
    prefix = "x" * 240  # the file is x...x_00000.png: 250 characters, under NAME_MAX (255)
    document = {"graphflow": 1, "nodes": {"photo": {"type": "LoadImage", "inputs": {"path": "room.png"}},
                                          "save": {"type": "SaveImage", "inputs": {"image": {"from": "photo.image"},
                                                                                   "prefix": prefix}}}}
    (workspace / "long.json").write_text(json.dumps(document))

    done = graphflow(["run", "long.json", "--quiet"], workspace)

    assert done.returncode == 0, done.stderr[-400:]
    assert (workspace / "output" / f"{prefix}_00000.png").is_file()
