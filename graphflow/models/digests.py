"""Content digests of model files, each file hashed once: an index keyed by what `stat` says about the file.

A model's fingerprint must be a pure function of its bytes, yet hashing gigabytes of weights at
every run is too slow. So each digest is remembered under the file's (device, inode, size,
mtime_ns, ctime_ns). Every write to a file moves its ctime to "now", and nothing (not even
`os.utime`) can set a ctime back, so a file whose status still matches an entry still holds the
bytes that were hashed — with one exception, the "racy git" case: a write within one timestamp
tick of the hashing may leave the ctime unchanged. An entry is therefore kept only when the file
was last changed clearly (`RACY_NS`) before hashing began; a file changed later than that is
hashed again next time, until its last change is far enough in the past.

The index lives in graphflow's cache home as one small JSON file, rewritten whole (atomically)
under a lock file, merging what other processes added meanwhile. A missing or corrupt index is
simply rebuilt; losing it costs time, never correctness.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from graphflow.atomic import atomic_write

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent writers may then drop each other's new entries
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# measured here (400 MB from the page cache, hashlib.file_digest): sha256 1.45 GB/s (SHA-NI), blake2b 0.81 GB/s
ALGORITHM = "sha256"
DIGEST_CHARS = 32  # 128 bits of the hash: plenty to tell files apart, half the index size
# how coarse file timestamps can be (FAT: 2 s; ext3, HFS+: 1 s; ext4 and tmpfs: a kernel tick)
RACY_NS = 2_000_000_000
MAX_INDEX_ENTRIES = 20_000  # beyond this the oldest entries are dropped (a few MB of JSON)
INDEX_NAME = "file-digests.json"
_VERSION = 1
_HASH_ATTEMPTS = 3


class FileChangingError(OSError):
    """A file changed every time it was hashed, so no digest describes it."""


def cache_home() -> Path:
    """graphflow's cache folder: $GRAPHFLOW_CACHE_HOME, else graphflow's folder in the user cache."""
    configured = os.environ.get("GRAPHFLOW_CACHE_HOME")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphflow"


def _status_key(status: os.stat_result) -> str:
    return f"{status.st_dev}:{status.st_ino}:{status.st_size}:{status.st_mtime_ns}:{status.st_ctime_ns}"


class DigestIndex:
    """Digests of files by status, persisted at `path`; safe to use from several threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, tuple[str, int]] | None = None  # status key -> (digest, when hashing began, ns)
        self._unsaved: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()
        self.hashed = 0  # files read and hashed by this index, for tests and diagnostics

    def digest(self, path: Path, status: os.stat_result) -> str:
        """The digest of the regular file at `path`, whose status (followed through symlinks) is `status`."""
        key = _status_key(status)
        with self._lock:
            entry = self._loaded().get(key)
        if entry is not None:
            return entry[0]
        digest, status, started = _hash(path)
        with self._lock:
            self.hashed += 1
            if started - status.st_ctime_ns > RACY_NS:  # changed clearly before hashing began: safe to remember
                self._loaded()[_status_key(status)] = self._unsaved[_status_key(status)] = (digest, started)
        return digest

    def save(self) -> None:
        """Merge the entries added since the last save into the index file (nothing happens if there are none)."""
        with self._lock:
            if not self._unsaved:
                return
            unsaved, self._unsaved = self._unsaved, {}
        try:
            with _locked(self.path.with_name(self.path.name + ".lock")):
                entries = _read(self.path)
                entries.update(unsaved)
                data = json.dumps({"version": _VERSION, "algorithm": ALGORITHM, "entries": _newest(entries)})
                atomic_write(self.path, data.encode())
        except OSError as error:  # the index only saves time: a read-only cache home costs re-hashing, not results
            log.warning("could not save the file digest index %s (%s); files will be hashed again", self.path, error)

    def _loaded(self) -> dict[str, tuple[str, int]]:
        if self._entries is None:
            self._entries = _read(self.path)
        if len(self._entries) > MAX_INDEX_ENTRIES:
            self._entries = _newest(self._entries)
        return self._entries


def _hash(path: Path) -> tuple[str, os.stat_result, int]:
    """(digest, status, when hashing began) of a file that stayed the same while it was read."""
    # O_NONBLOCK: a file swapped for a FIFO since it was listed must not block the open; reads of a regular file
    # ignore the flag. O_NOFOLLOW: `path` is a real path, so a symlink there was put in since.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(_HASH_ATTEMPTS):
        with open(os.open(path, flags), "rb") as file:
            before = os.fstat(file.fileno())
            if not stat.S_ISREG(before.st_mode):
                raise OSError(f"{path} is not a regular file")
            started = time.time_ns()
            digest = hashlib.file_digest(file, ALGORITHM).hexdigest()[:DIGEST_CHARS]
            if _status_key(os.fstat(file.fileno())) == _status_key(before):
                return digest, before, started
    raise FileChangingError(f"{path} changed each of the {_HASH_ATTEMPTS} times it was read; wait until whatever "
                            "writes it has finished")


def _read(path: Path) -> dict[str, tuple[str, int]]:
    """The entries of an index file; {} when it is missing, unreadable, corrupt or of another format."""
    try:
        data = json.loads(path.read_bytes())
        if data.get("version") != _VERSION or data.get("algorithm") != ALGORITHM:
            return {}
        return {key: (digest, int(started)) for key, (digest, started) in data["entries"].items()
                if isinstance(key, str) and isinstance(digest, str) and isinstance(started, int)}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}


def _newest(entries: dict[str, tuple[str, int]]) -> dict[str, tuple[str, int]]:
    if len(entries) <= MAX_INDEX_ENTRIES:
        return entries
    return dict(sorted(entries.items(), key=lambda item: item[1][1])[-MAX_INDEX_ENTRIES:])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed), so one process at a time merges into the index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


_indexes: dict[Path, DigestIndex] = {}
_indexes_lock = threading.Lock()


def shared_index() -> DigestIndex:
    """The process's index for the current cache home (one per folder, so a changed $GRAPHFLOW_CACHE_HOME is used)."""
    path = cache_home() / INDEX_NAME
    with _indexes_lock:
        index = _indexes.get(path)
        if index is None:
            index = _indexes[path] = DigestIndex(path)
        return index
