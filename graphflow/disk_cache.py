"""Results kept across processes: the on-disk tier for nodes whose results are expensive.

Node types opt in with `disk_cache = True`. A result is one safetensors file per cache key,
`DIR/ab/ab….safetensors`: tensors and numpy arrays in their own dtypes, and in its `__metadata__`
graphflow's JSON manifest (dicts, lists, tuples, JSON scalars, and which leaves are tensors or arrays),
the key, and a digest of all of it, checked on every read. Nothing is ever unpickled; values with no such
form (model handles) are not stored. An entry that cannot be read back exactly is a miss, and is removed.
The cache never follows a symlink out of its directory (which may itself be one: it is resolved once), and
`get` and `put` raise nothing: a failing disk costs the cached copy, never the run.

The directory is bounded by bytes, least recently used first (a read refreshes the mtime), live writers'
temporary files included. A running total spares a walk per put: the directory is walked (and dead writers'
temporary files removed) on the first put, every `_RESCAN_PUTS` puts or `_RESCAN_SECONDS`, and when the
entries the last walk found are used up while the total is still over.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphflow.atomic import atomic_write, remove_stale_temp_files, temp_target
from graphflow.disk_format import NotStorable, Unreadable, decode_entry, encode_entry

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
_KEY = re.compile(r"[0-9a-f]{32}")
_SHARD = re.compile(r"[0-9a-f]{2}")
_LEGACY_SUFFIX = ".npz"
_ENTRY_NAME = re.compile(r"[0-9a-f]{32}(\.safetensors|\.npz)")
_RESCAN_PUTS = 256
_RESCAN_SECONDS = 60.0
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW
_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _NOFOLLOW  # a FIFO must not block the open


@dataclass(frozen=True, order=True)
class _Entry:
    """A file as last seen, least recently used first; format-1 files are never read, so they age out."""

    mtime_ns: int
    shard: str
    name: str
    size: int
    inode: int

    @classmethod
    def of(cls, shard: str, name: str, status: os.stat_result) -> _Entry:
        return cls(status.st_mtime_ns, shard, name, status.st_size, status.st_ino)


class DiskCache:
    """A directory of results by cache key, least recently used removed once `max_bytes` is exceeded."""

    def __init__(self, directory: str | Path, max_bytes: int = 10 << 30) -> None:
        self.directory = Path(os.path.realpath(directory))  # a symlink here is the user's choice: followed once
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # guards the running total and the eviction queue
        self._total = 0  # bytes in the directory as last walked, plus this cache's puts since
        self._queue: list[_Entry] = []  # a heap of eviction candidates: the least recently used on top
        self._puts_since_scan = 0
        self._scanned_at: float | None = None

    def path(self, key: str) -> Path:
        """Where the entry for `key` lives."""
        return self.directory / key[:2] / f"{key}{SUFFIX}"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored result, or None when absent or unreadable (an unreadable entry is removed)."""
        if _refused(key):
            return None
        try:
            with _opened(self.directory, _DIR_FLAGS) as root, _opened(key[:2], _DIR_FLAGS, root) as shard:
                return self._read(shard, key)
        except FileNotFoundError:
            return None
        except Exception as error:  # a shard that is a symlink, a directory we may not read, …: a miss
            logger.warning("disk cache: cannot read %s (%s); the node runs again", self.path(key), error)
            return None

    def put(self, key: str, outputs: dict[str, Any]) -> bool:
        """Store a result; False when it has no pickle-free form, is over `max_bytes`, or the disk refuses it."""
        if _refused(key):
            return False
        try:
            data = encode_entry(key, outputs)
            if len(data) > self.max_bytes:
                raise NotStorable(f"{len(data)} bytes, over the cache's bound of {self.max_bytes}")
            entry = self._write(key, data)
        except NotStorable as reason:
            logger.debug("disk cache: not storing %s: %s", key, reason)
            return False
        except Exception as error:  # a full disk or an unusable directory costs the cached copy, never the run
            logger.warning("disk cache: cannot write %s (%s); the result is kept in memory only", self.path(key), error)
            return False
        try:
            self._account(entry)
        except Exception as error:  # stored all the same; the next walk tries again
            logger.warning("disk cache: cannot keep %s within %d bytes (%s)", self.directory, self.max_bytes, error)
        return True

    def _read(self, shard: int, key: str) -> dict[str, Any] | None:
        try:
            handle = os.open(f"{key}{SUFFIX}", _FILE_FLAGS, dir_fd=shard)
        except FileNotFoundError:
            return None
        except OSError as error:  # ELOOP: a symlink, which is never followed
            self._discard(shard, key, None, error)
            return None
        status = None
        try:
            status = os.fstat(handle)
            outputs = decode_entry(key, _read_whole(handle, status, self.max_bytes))
            with contextlib.suppress(OSError):  # a read-only cache still serves; only its recency goes stale
                os.utime(handle)  # recently used: evicted last
        except Exception as error:
            self._discard(shard, key, status, error)
            return None
        finally:
            os.close(handle)
        return outputs

    def _discard(self, shard: int, key: str, seen: os.stat_result | None, reason: Exception) -> None:
        """Remove an unreadable entry (a miss), unless a writer has replaced it since it was read."""
        name, outcome = f"{key}{SUFFIX}", "removed it"
        try:
            now = os.stat(name, dir_fd=shard, follow_symlinks=False)
            if stat.S_ISREG(now.st_mode) and (seen is None or not os.path.samestat(now, seen)):
                return  # a file we could not open (EMFILE, EACCES), or a fresh one: not ours to judge
            _remove(shard, name, now)
        except OSError as error:
            outcome = f"cannot remove it: {error}"
        logger.warning("disk cache: %s is unreadable (%s); %s, the node runs again", self.path(key), reason, outcome)

    def _write(self, key: str, data: bytes) -> _Entry:
        shard_name, name = key[:2], f"{key}{SUFFIX}"
        self.directory.mkdir(parents=True, exist_ok=True)
        with _opened(self.directory, _DIR_FLAGS) as root:
            _clear(root, shard_name, stat.S_ISDIR)
            with contextlib.suppress(FileExistsError):
                os.mkdir(shard_name, dir_fd=root)
            with _opened(shard_name, _DIR_FLAGS, root) as shard:
                _clear(shard, name, stat.S_ISREG)  # a directory, FIFO or symlink where the entry belongs
                shard_path = self.directory / shard_name
                if not _is_opened(shard_path, shard):  # atomic_write goes by path: it must still lead here
                    raise OSError(f"{shard_path} was replaced while in use")
                atomic_write(shard_path / name, data)
                return _Entry.of(shard_name, name, os.stat(name, dir_fd=shard, follow_symlinks=False))

    def _account(self, entry: _Entry) -> None:
        with self._lock:
            self._puts_since_scan += 1
            if (self._scanned_at is None or self._puts_since_scan >= _RESCAN_PUTS
                    or time.monotonic() - self._scanned_at > _RESCAN_SECONDS):
                self._scan()
            else:
                self._total += entry.size
                heapq.heappush(self._queue, entry)
            self._evict()

    def _evict(self) -> None:
        rescanned = False
        while self._total > self.max_bytes:
            if not self._queue:
                if rescanned:
                    return  # what is left is live writers' files: the bound holds once they finish
                self._scan()  # others' entries, and entries re-read since the walk, are unknown to the queue
                rescanned = True
                continue
            self._total -= self._drop(heapq.heappop(self._queue))

    def _drop(self, entry: _Entry) -> int:
        """Evict `entry` if it is unchanged and unread since it was seen; the bytes that leaves the total."""
        try:
            with _opened(self.directory, _DIR_FLAGS) as root, _opened(entry.shard, _DIR_FLAGS, root) as shard:
                status = os.stat(entry.name, dir_fd=shard, follow_symlinks=False)
                if not stat.S_ISREG(status.st_mode):
                    return entry.size
                if (status.st_ino, status.st_mtime_ns) != (entry.inode, entry.mtime_ns):  # read or rewritten
                    heapq.heappush(self._queue, _Entry.of(entry.shard, entry.name, status))
                    return entry.size - status.st_size
                os.unlink(entry.name, dir_fd=shard)
        except FileNotFoundError:  # another process evicted it first
            pass
        return entry.size

    def _scan(self) -> None:
        """Walk the directory: remove dead writers' files, total the bytes, order entries by last use."""
        entries: list[_Entry] = []
        total = 0
        with _opened(self.directory, _DIR_FLAGS) as root:
            with os.scandir(root) as listing:
                shards = [item.name for item in listing
                          if _SHARD.fullmatch(item.name) and item.is_dir(follow_symlinks=False)]
            for shard_name in shards:
                with contextlib.suppress(OSError), _opened(shard_name, _DIR_FLAGS, root) as shard:
                    if _is_opened(self.directory / shard_name, shard):  # it goes by path
                        for suffix in (SUFFIX, _LEGACY_SUFFIX):
                            remove_stale_temp_files(self.directory / shard_name, suffix)
                    total += _scan_shard(shard_name, shard, entries)
        heapq.heapify(entries)
        self._total = total + sum(entry.size for entry in entries)
        self._queue = entries
        self._puts_since_scan = 0
        self._scanned_at = time.monotonic()


def _scan_shard(shard_name: str, shard: int, entries: list[_Entry]) -> int:
    """Append the shard's entries to `entries`; the bytes of live writers' temporary files in it."""
    temporary = 0
    with os.scandir(shard) as listing:
        for item in listing:
            target = temp_target(item.name)  # None unless a writer's temporary file
            if not _ENTRY_NAME.fullmatch(target or item.name):
                continue  # not ours: neither counted nor touched
            with contextlib.suppress(FileNotFoundError):
                status = item.stat(follow_symlinks=False)
                if not stat.S_ISREG(status.st_mode):
                    continue
                if target is not None:
                    temporary += status.st_size
                else:
                    entries.append(_Entry.of(shard_name, item.name, status))
    return temporary


def _refused(key: object) -> bool:
    """Whether `key` is not a cache key, which no path is ever built from."""
    if isinstance(key, str) and _KEY.fullmatch(key):
        return False
    logger.warning("disk cache: refused the key %r (expected 32 lowercase hex digits)", key)
    return True


@contextlib.contextmanager
def _opened(path: str | Path, flags: int, dir_fd: int | None = None) -> Iterator[int]:
    handle = os.open(path, flags, dir_fd=dir_fd)
    try:
        yield handle
    finally:
        os.close(handle)


def _clear(directory: int, name: str, wanted: Callable[[int], bool]) -> None:
    """Remove what is at `name` unless its mode is `wanted`: a symlink itself goes, never what it points to."""
    with contextlib.suppress(FileNotFoundError):
        status = os.stat(name, dir_fd=directory, follow_symlinks=False)
        if not wanted(status.st_mode):
            _remove(directory, name, status)


def _is_opened(path: Path, handle: int) -> bool:
    """Whether `path`, with no symlink anywhere along it, is the directory open as `handle`."""
    return os.path.realpath(path) == str(path) and os.path.samestat(os.lstat(path), os.fstat(handle))


def _remove(directory: int, name: str, status: os.stat_result) -> None:
    if stat.S_ISDIR(status.st_mode):
        shutil.rmtree(name, dir_fd=directory)  # fd-based: never follows a symlink inside
    else:
        os.unlink(name, dir_fd=directory)


def _read_whole(handle: int, status: os.stat_result, limit: int) -> bytes:
    if not stat.S_ISREG(status.st_mode):
        raise Unreadable(f"not a regular file (mode {stat.filemode(status.st_mode)})")
    if status.st_size > limit:
        raise Unreadable(f"{status.st_size} bytes, over the cache's bound of {limit}")
    with open(handle, "rb", closefd=False) as file:
        data = file.read(status.st_size + 1)
    if len(data) != status.st_size:
        raise Unreadable(f"{len(data)} bytes read where the file has {status.st_size}")
    return data
