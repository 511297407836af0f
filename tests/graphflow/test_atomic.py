"""Atomic writes where the platform lacks POSIX's extras (Windows, Python 3.11): no os.fchmod, no flock, no
O_NOFOLLOW, no hard links on the volume, a rename that refuses to replace, and no renaming, linking or deleting of a
file that is still open. Those are taken away or emulated here, and writes must stay whole, exclusive when asked,
with the usual permissions, and leave no temporary file behind."""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import graphflow.atomic as atomic
from graphflow.atomic import Staged, atomic_write, remove_stale_temp_files, temp_target
from graphflow.cli import main

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds open files through /proc")

REAL_REPLACE, REAL_RENAME, REAL_LINK, REAL_UNLINK = os.replace, os.rename, os.link, os.unlink
MODE = 0o666 & ~atomic._UMASK


def open_here(path: str | os.PathLike[str]) -> bool:
    """Whether this process has `path` open (what makes Windows refuse to rename, link or delete it)."""
    wanted = os.path.realpath(path)
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == wanted:
                return True
        except OSError:
            continue
    return False


def refuse_open(real: Callable[..., Any], *names: int) -> Callable[..., Any]:
    """`real`, refusing as Windows does when the path argument at any of `names` (positions) is open."""
    def call(*args: Any, **kwargs: Any) -> Any:
        for position in names:
            if position < len(args) and os.path.lexists(args[position]) and open_here(args[position]):
                raise PermissionError(errno.EACCES, "The process cannot access the file because it is being used "
                                                    "by another process", str(args[position]))
        return real(*args, **kwargs)
    return call


def windows_rename(source: Any, target: Any) -> None:
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "Cannot create a file when that file already exists", str(target))
    refuse_open(REAL_RENAME, 0)(source, target)


@pytest.fixture
def windows_like(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delattr(os, "fchmod", raising=False)
    monkeypatch.delattr(os, "O_NOFOLLOW", raising=False)
    monkeypatch.setattr(atomic, "fcntl", None)
    monkeypatch.setattr(atomic, "_RENAME_REPLACES", False)
    monkeypatch.setattr(atomic, "_REPLACE_ATTEMPTS", 10)
    monkeypatch.setattr(atomic, "_REPLACE_RETRY_SECONDS", 0.001)
    monkeypatch.setattr(os, "replace", refuse_open(REAL_REPLACE, 0, 1))
    monkeypatch.setattr(os, "rename", windows_rename)
    monkeypatch.setattr(os, "link", refuse_open(REAL_LINK, 0))
    monkeypatch.setattr(os, "unlink", refuse_open(REAL_UNLINK, 0))
    return monkeypatch


def no_hard_links(monkeypatch: pytest.MonkeyPatch) -> None:
    def link(source: Any, target: Any) -> None:
        raise OSError(errno.EPERM, "Incorrect function", str(source))  # FAT, as Windows reports it
    monkeypatch.setattr(os, "link", link)


def temporary_files(directory: Path) -> list[str]:
    return [entry.name for entry in directory.iterdir() if temp_target(entry.name) is not None]


def test_a_write_replaces_the_file_with_the_usual_permissions(windows_like: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "graph.json"
    path.write_bytes(b"old")

    atomic_write(path, b"new " * 1000)

    assert path.read_bytes() == b"new " * 1000
    assert stat.S_IMODE(path.stat().st_mode) == MODE  # not mkstemp's 0600, though os.fchmod is missing
    assert temporary_files(tmp_path) == []


def test_exclusive_writes_never_replace_with_hard_links(windows_like: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "a.png"

    assert atomic_write(path, b"first", exclusive=True)
    assert not atomic_write(path, b"second", exclusive=True)

    assert path.read_bytes() == b"first" and stat.S_IMODE(path.stat().st_mode) == MODE
    assert temporary_files(tmp_path) == []


def test_exclusive_writes_never_replace_on_a_volume_without_hard_links(
        windows_like: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_hard_links(windows_like)
    path = tmp_path / "a.png"

    assert atomic_write(path, b"first", exclusive=True)
    assert not atomic_write(path, b"second", exclusive=True)

    assert path.read_bytes() == b"first"
    assert temporary_files(tmp_path) == []


def test_without_hard_links_where_rename_replaces_an_exclusive_write_fails_loudly(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_hard_links(monkeypatch)
    path = tmp_path / "a.png"
    path.write_bytes(b"theirs")

    with pytest.raises(OSError, match="Incorrect function"):
        atomic_write(path, b"ours", exclusive=True)

    assert path.read_bytes() == b"theirs" and temporary_files(tmp_path) == []


def test_a_replace_blocked_for_a_moment_by_another_handle_is_retried(
        windows_like: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_bytes(b"old")
    refusals = []

    def busy_then_free(source: Any, target: Any) -> None:
        if len(refusals) < 3:
            refusals.append(target)
            raise PermissionError(errno.EACCES, "being used by another process", str(target))
        REAL_REPLACE(source, target)
    windows_like.setattr(os, "replace", busy_then_free)

    atomic_write(path, b"new")

    assert path.read_bytes() == b"new" and len(refusals) == 3
    assert temporary_files(tmp_path) == []


def test_a_replace_that_stays_blocked_raises_and_keeps_the_old_file(
        windows_like: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_bytes(b"old")
    attempts = []

    def busy(source: Any, target: Any) -> None:
        attempts.append(target)
        raise PermissionError(errno.EACCES, "being used by another process", str(target))
    windows_like.setattr(os, "replace", busy)

    with pytest.raises(PermissionError):
        atomic_write(path, b"new")

    assert path.read_bytes() == b"old" and len(attempts) == 10
    assert temporary_files(tmp_path) == []


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(
        windows_like: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "graph.json"
    path.write_bytes(b"old")

    def full(handle: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")
    windows_like.setattr(os, "write", full)

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, b"new")

    assert path.read_bytes() == b"old" and temporary_files(tmp_path) == []


def test_a_staged_batch_knows_its_files_once_placed(windows_like: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_hard_links(windows_like)  # placed by rename: the temporary name is gone, the file is still known
    with Staged(tmp_path, "a.png", b"one") as first, Staged(tmp_path, "a.png", b"two") as second:
        assert first.place(tmp_path / "a_00000.png", exclusive=True)
        assert not second.place(tmp_path / "a_00000.png", exclusive=True)
        assert second.place(tmp_path / "a_00001.png", exclusive=True)

        assert first.is_at(tmp_path / "a_00000.png") and not second.is_at(tmp_path / "a_00000.png")
        assert second.is_at(tmp_path / "a_00001.png")

    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["a_00000.png", "a_00001.png"]
    assert (tmp_path / "a_00001.png").read_bytes() == b"two"


def test_stale_files_are_told_by_age_and_symlinks_are_left_alone(
        windows_like: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hour_ago = time.time() - 2 * atomic._UNLOCKABLE_GRACE_SECONDS
    stale, fresh = tmp_path / ".a.png.abcdefgh.tmp", tmp_path / ".b.png.abcdefgh.tmp"
    elsewhere = tmp_path / "keep" / "precious.png"
    elsewhere.parent.mkdir()
    link = tmp_path / ".c.png.abcdefgh.tmp"
    for path in (stale, fresh, elsewhere):
        path.write_bytes(b"12345")
    link.symlink_to(elsewhere)
    for path in (stale, elsewhere):
        os.utime(path, (hour_ago, hour_ago))

    assert remove_stale_temp_files(tmp_path, ".png") == 5  # O_NOFOLLOW is missing: lstat tells the symlink

    assert not stale.exists() and fresh.exists() and link.is_symlink() and elsewhere.read_bytes() == b"12345"


def test_a_graph_runs_and_saves_its_images_and_document(windows_like: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 40, 40)).save(tmp_path / "room.png")
    graph = tmp_path / "g.json"
    graph.write_text(json.dumps({"graphflow": 1, "nodes": {
        "photo": {"type": "LoadImage", "inputs": {"path": "room.png"}},
        "save": {"type": "SaveImage", "inputs": {"image": {"from": "photo.image"}, "prefix": "room"}}}}))
    out = tmp_path / "out"

    assert main(["run", str(graph), "--out", str(out), "--quiet"]) == 0
    assert main(["run", str(graph), "--out", str(out), "--quiet"]) == 0

    assert sorted(entry.name for entry in out.iterdir()) == ["room_00000.png", "room_00001.png"]
    assert stat.S_IMODE((out / "room_00001.png").stat().st_mode) == MODE
    with Image.open(out / "room_00001.png") as saved:
        assert saved.getpixel((3, 3)) == (200, 40, 40)
