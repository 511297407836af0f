"""Writes that readers see whole or not at all, and the temporary files a killed writer leaves behind.

A write goes to a temporary file beside its target, `.NAME.XXXXXXXX.tmp`, which is then renamed
(or hard-linked) into place. The writer holds an exclusive `flock` on that file for as long as it
lives, so a temporary file that nobody holds a lock on belongs to a writer that died (kill -9,
power loss) and can be removed: `remove_stale_temp_files` does that, and never touches a live
writer's file.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale files are then recognised by age alone
    fcntl = None  # type: ignore[assignment]

TEMP_SUFFIX = ".tmp"
# mkstemp's random part is 8 characters of [a-z0-9_]; anything else is not ours and is never removed
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
# a writer locks its file right after creating it; an empty unlocked file may be one caught in between
_EMPTY_GRACE_SECONDS = 10.0
_UNLOCKABLE_GRACE_SECONDS = 3600.0  # without flock, only files this old count as stale


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import, before any thread writes files
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: Path, data: bytes, *, exclusive: bool = False) -> bool:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part.

    With `exclusive`, an existing file is never replaced: returns False instead.
    """
    with Staged(path.parent, path.name, data) as staged:
        return staged.place(path, exclusive=exclusive)


class Staged:
    """`data` written whole (and synced) to a temporary file in `directory`, locked while it lives, ready to be
    put in place: several of them can be written first and placed together (a batch all or none). Used as a
    context manager, it removes its temporary file on leaving (placed, it lives on under its new name)."""

    def __init__(self, directory: Path, name: str, data: bytes) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._handle, self._name = tempfile.mkstemp(dir=directory, prefix=f".{_short(name)}.", suffix=TEMP_SUFFIX)
        try:
            if fcntl is not None:
                fcntl.flock(self._handle, fcntl.LOCK_EX)  # held until the handle closes: marks a live write
            os.fchmod(self._handle, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
            view = memoryview(data)
            while view:
                view = view[os.write(self._handle, view):]
            os.fsync(self._handle)
        except BaseException:
            self.discard()
            raise

    def place(self, path: Path, *, exclusive: bool = False) -> bool:
        """Put the data at `path` (replacing what is there, or with `exclusive`, False if something is)."""
        if not exclusive:
            os.replace(self._name, path)
            return True
        try:
            os.link(self._name, path)
        except FileExistsError:
            return False
        return True

    def is_at(self, path: Path) -> bool:
        """Whether `path` is this file (placed there by `place`, even if an interrupt stopped it from saying so)."""
        if self._handle < 0:
            return False
        try:
            here, there = os.fstat(self._handle), os.lstat(path)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def discard(self) -> None:
        if self._handle < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._name)
        os.close(self._handle)
        self._handle = -1

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def _short(name: str) -> str:
    """`name`, or for a name so long that the temporary one would pass the usual 255-byte limit, its start and a
    digest of it, with its suffix kept (so cleanups that match the suffix still find it)."""
    if len(name.encode("utf-8", "surrogateescape")) <= 200:
        return name
    import hashlib

    _, dot, suffix = name.rpartition(".")
    suffix = f".{suffix}" if dot and len(suffix) <= 16 else ""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=6).hexdigest()
    return f"{name[:100]}~{digest}{suffix}"


def temp_target(name: str) -> str | None:
    """The file name a temporary file of `atomic_write` was going to become, or None if `name` is not one."""
    match = _TEMP_NAME.fullmatch(name)
    return match["target"] if match else None


def remove_stale_temp_files(directory: Path, suffix: str = "") -> int:
    """Remove the temporary files that dead writers left in `directory` for targets ending in `suffix`.

    Returns the bytes removed. Live writers' files (locked) are left alone, and so is every file that is
    not a regular file with the exact temporary-name pattern (symlinks included).
    """
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        target = temp_target(entry.name)
        if target is None or not target.endswith(suffix):
            continue
        with contextlib.suppress(OSError):
            removed += _remove_if_stale(Path(entry.path))
    return removed


def _remove_if_stale(path: Path) -> int:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    handle = os.open(path, flags)
    try:
        status = os.fstat(handle)
        age = time.time() - status.st_mtime
        if not stat.S_ISREG(status.st_mode):
            return 0
        if fcntl is None:
            stale = age > _UNLOCKABLE_GRACE_SECONDS
        else:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a live writer holds it
            stale = status.st_size > 0 or age > _EMPTY_GRACE_SECONDS
        if not stale:
            return 0
        path.unlink()
        return status.st_size
    finally:
        os.close(handle)

