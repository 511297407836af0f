"""Writes that readers see whole or not at all, and the temporary files a killed writer leaves behind.

A write goes to a temporary file beside its target, `.NAME.XXXXXXXX.tmp`, which is then renamed
(or hard-linked) into place. The writer holds an exclusive `flock` on that file for as long as it
lives, so a temporary file that nobody holds a lock on belongs to a writer that died (kill -9,
power loss) and can be removed: `remove_stale_temp_files` does that, and never touches a live
writer's file.

Portable to Windows (Python 3.11 on): what a platform lacks is tested for, not assumed. Without
`flock` the temporary file is closed once written, since Windows renames, links and deletes no
open file, and stale files are told by age; without `os.fchmod` (Windows before 3.13) the mode
is set by name; without `O_NOFOLLOW` a symlink is recognised by comparing `lstat` with `fstat`.
A replace that another process's open handle blocks (a Windows reader or virus scanner) is
retried briefly, and a volume without hard links places exclusive writes by a rename that never
replaces. No folder is synced: a rename is what a reader sees, and Windows cannot open a folder.
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
# Windows semantics that no attribute reveals: its rename refuses an existing target (so it can place exclusively
# where hard links are missing), and a file open elsewhere cannot be replaced until that handle closes
_RENAME_REPLACES = os.name != "nt"
_REPLACE_ATTEMPTS = 1 if _RENAME_REPLACES else 10
_REPLACE_RETRY_SECONDS = 0.05  # doubled after each refusal: at most ~0.5 s in all before the error is raised


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
        handle, self._name = tempfile.mkstemp(dir=directory, prefix=f".{_short(name)}.", suffix=TEMP_SUFFIX)
        self._handle: int | None = handle  # None once closed
        self._live = True  # until discarded: the temporary name still ours to remove
        try:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX)  # held until the handle closes: marks a live write
            _set_mode(handle, self._name, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
            view = memoryview(data)
            while view:
                view = view[os.write(handle, view):]
            os.fsync(handle)
            self._identity = os.fstat(handle)
            if fcntl is None:  # no lock to hold, and an open file could be neither renamed nor linked on Windows
                self._close()
        except BaseException:
            self.discard()
            raise

    def place(self, path: Path, *, exclusive: bool = False) -> bool:
        """Put the data at `path` (replacing what is there, or with `exclusive`, False if something is)."""
        if not exclusive:
            _replace(self._name, path)
            return True
        try:
            os.link(self._name, path)
        except FileExistsError:
            return False
        except OSError:  # a volume without hard links (FAT, some network shares)
            if _RENAME_REPLACES:
                raise  # nothing else places a whole file without ever replacing one
            try:
                os.rename(self._name, path)  # refuses an existing target here
            except FileExistsError:
                return False
        return True

    def is_at(self, path: Path) -> bool:
        """Whether `path` is this file (placed there by `place`, even if an interrupt stopped it from saying so)."""
        if not self._live:
            return False
        try:
            there = os.lstat(path)
        except OSError:
            return False
        return os.path.samestat(self._identity, there)

    def discard(self) -> None:
        if not self._live:
            return
        self._close()  # first: Windows deletes no open file
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._name)
        self._live = False

    def _close(self) -> None:
        if self._handle is not None:
            os.close(self._handle)
            self._handle = None

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def _set_mode(handle: int, name: str, mode: int) -> None:
    fchmod = getattr(os, "fchmod", None)  # missing on Windows before Python 3.13
    if fchmod is not None:
        fchmod(handle, mode)
    else:  # by name: the file mkstemp just made, which only this process has opened
        os.chmod(name, mode)


def _replace(source: str, target: Path) -> None:
    """os.replace, retried briefly where a handle open elsewhere on the target refuses it for a moment."""
    delay = _REPLACE_RETRY_SECONDS
    for attempt in range(1, _REPLACE_ATTEMPTS + 1):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if attempt == _REPLACE_ATTEMPTS:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


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
    seen = os.lstat(path)  # where O_NOFOLLOW is missing, this tells a symlink from the file opened through it
    if not stat.S_ISREG(seen.st_mode):
        return 0
    handle = os.open(path, flags)
    try:
        status = os.fstat(handle)
        if not stat.S_ISREG(status.st_mode) or not os.path.samestat(seen, status):
            return 0
        age = time.time() - status.st_mtime
        if fcntl is None:
            stale = age > _UNLOCKABLE_GRACE_SECONDS
        else:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a live writer holds it
            stale = status.st_size > 0 or age > _EMPTY_GRACE_SECONDS
    finally:
        os.close(handle)  # before unlinking: Windows deletes no open file (and a dead writer's file stays dead)
    if not stale:
        return 0
    path.unlink()
    return status.st_size
