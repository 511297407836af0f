"""What a model source consists of: every file a loader could read, each checked to lie inside the source's roots.

`list_files` walks a model folder the way loaders see it — following symlinks, to files and to
subfolders — but refuses, before anything reads them, entries that lead outside the roots, symlink
loops, anything that is not a regular file or folder, and folders too large or too deep to be a
model. `content_fingerprint` digests what the listed files hold (through the digest index), so it
changes whenever a file a loader could read changes, however its name, size or times look.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from graphflow import types
from graphflow.errors import Code, GraphError
from graphflow.models.digests import shared_index
from graphflow.paths import PathError

MAX_ENTRIES = 10_000  # a diffusers checkpoint has ~20 files, a hub snapshot of annotators ~100
MAX_DEPTH = 16
# formats no graphflow loader reads (weights load from .safetensors; pickles other than annotators' .pth/.pt are
# refused), so they stay out of the fingerprint: hashing a folder's .bin twins of its weights would only cost time
NEVER_READ = frozenset({".bin", ".ckpt", ".pkl", ".pickle", ".onnx", ".msgpack", ".h5", ".gguf", ".tflite"})
MISSING = "missing"  # the digest of a dangling symlink: a loader would fail on it, and its target may yet appear


@dataclass(frozen=True)
class ModelFile:
    """One file of a model source: its name as loaders give it, where its bytes are, and its status then."""

    name: str  # relative to the source's folder, with "/" between parts
    path: Path  # the real path, every symlink resolved
    status: os.stat_result | None  # None for a dangling symlink


@dataclass(frozen=True)
class Walk:
    """What `list_files` reports problems about: the source, the node input naming it, and the allowed roots."""

    source: str
    roots: tuple[Path, ...]
    node: str | None = None
    input: str | None = None

    def refuse(self, code: Code, message: str, expected: str, found: str) -> PathError:
        return PathError(GraphError(code, f"model '{self.source}': {message}", self.node, self.input, expected,
                                    types.show_value(found)))

    def inside(self, path: Path) -> bool:
        return any(path.is_relative_to(root) for root in self.roots)


def list_files(top: Path, walk: Walk) -> list[ModelFile]:
    """The files of the model at `top` (a real path: a folder, or one file), sorted by name; PathError if refused."""
    status = _status(top, top.name, walk)
    if status is None or not stat.S_ISDIR(status.st_mode):
        return [_file(top.name, top, status, walk)]
    files: list[ModelFile] = []
    pending = [(top, "", ((status.st_dev, status.st_ino),))]  # (real folder, its name, the folders above it)
    seen = 0
    while pending:
        folder, prefix, above = pending.pop()
        try:
            entries = sorted(_entries(folder, walk, seen), key=lambda entry: entry.name)
        except OSError as error:
            raise walk.refuse(Code.INVALID_VALUE, f"cannot list {folder}: {error.strerror}", "a readable folder",
                              prefix or top.name) from None
        seen += len(entries)
        for entry in entries:
            name = prefix + entry.name
            real = Path(os.path.realpath(entry.path)) if entry.is_symlink() else folder / entry.name
            if not walk.inside(real):
                raise walk.refuse(Code.PATH_OUTSIDE_ROOT, f"'{name}' in {top} leads to {real}, outside "
                                  f"{_roots(walk)}; a loader must not read it", f"files inside {_roots(walk)}", name)
            status = _status(real, name, walk)
            if status is not None and stat.S_ISDIR(status.st_mode):
                pending.append((real, name + "/", _below(above, status, name, walk)))
            else:
                files.append(_file(name, real, status, walk))
    return sorted(files, key=lambda file: file.name)


def content_fingerprint(files: list[ModelFile], walk: Walk) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(fingerprint, (name, digest) of each file a loader may read) of `files`: a digest of names and contents."""
    index = shared_index()
    digests = []
    for file in files:
        if Path(file.name).suffix.lower() in NEVER_READ:
            continue
        try:
            digests.append((file.name, MISSING if file.status is None else index.digest(file.path, file.status)))
        except OSError as error:
            raise walk.refuse(Code.INVALID_VALUE, f"cannot read '{file.name}' ({file.path}): {error}",
                              "a readable file", file.name) from None
    index.save()
    lines = "".join(f"{name}\0{digest}\n" for name, digest in digests)
    return hashlib.sha256(lines.encode("utf-8", "surrogateescape")).hexdigest()[:32], tuple(digests)


def _entries(folder: Path, walk: Walk, seen: int) -> list[os.DirEntry[str]]:
    """The entries of one folder, stopping as soon as the whole walk has seen more than MAX_ENTRIES."""
    entries = []
    with os.scandir(folder) as listing:
        for entry in listing:
            entries.append(entry)
            if seen + len(entries) > MAX_ENTRIES:
                raise walk.refuse(Code.INVALID_VALUE, f"more than {MAX_ENTRIES:,} files and folders; that is not "
                                  "one model (name the model's own folder)", f"at most {MAX_ENTRIES:,} entries",
                                  str(folder))
    return entries


def _status(path: Path, name: str, walk: Walk) -> os.stat_result | None:
    """The status of `path` through symlinks; None for a dangling one."""
    try:
        return os.stat(path)
    except OSError as error:
        if error.errno == errno.ENOENT:
            return None
        if error.errno == errno.ELOOP:
            raise walk.refuse(Code.INVALID_VALUE, f"'{name}' is a symlink loop", "a symlink that ends at a file or "
                              "folder", name) from None
        raise walk.refuse(Code.INVALID_VALUE, f"cannot read '{name}' ({path}): {error.strerror}", "a readable file",
                          name) from None


def _below(above: tuple[tuple[int, int], ...], status: os.stat_result, name: str,
           walk: Walk) -> tuple[tuple[int, int], ...]:
    """The folders above `name`'s contents; refuses a folder that contains itself or lies too deep."""
    identity = (status.st_dev, status.st_ino)
    if identity in above:
        raise walk.refuse(Code.INVALID_VALUE, f"'{name}' is a symlink loop: it leads back to a folder that "
                          "contains it", "symlinks that do not lead back up", name)
    if len(above) > MAX_DEPTH:
        raise walk.refuse(Code.INVALID_VALUE, f"'{name}' is nested more than {MAX_DEPTH} folders deep; that is not "
                          "one model", f"at most {MAX_DEPTH} levels of folders", name)
    return (*above, identity)


def _file(name: str, path: Path, status: os.stat_result | None, walk: Walk) -> ModelFile:
    if status is not None and not stat.S_ISREG(status.st_mode):  # a FIFO or device would hang or flood a reader
        raise walk.refuse(Code.INVALID_VALUE, f"'{name}' ({path}) is not a regular file", "regular files and "
                          "folders", name)
    return ModelFile(name, path, status)


def _roots(walk: Walk) -> str:
    return ", ".join(str(root) for root in walk.roots)
