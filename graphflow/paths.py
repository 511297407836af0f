"""Where nodes may read and write: paths stay inside the roots the user allowed.

A relative input path is looked up in the folder of the document that names it (a template's
node also in the folders of the documents using the template), then in each input root in
order; the first place that holds it wins. A document's folder is an input root for its own
nodes. A relative output path resolves under the output root. A path that leaves its roots —
through `..`, an absolute path or a symlink — is refused unless the user widened the roots.

Documents written before paths resolved against their folder named files relative to the
current directory; such a path is still found there (when the current directory is a root),
with a warning naming the path to write instead.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from graphflow import types
from graphflow.errors import Code, GraphError, GraphflowError

log = logging.getLogger(__name__)


class PathError(GraphflowError):
    """A path is missing or outside the allowed roots."""

    def __init__(self, error: GraphError) -> None:
        self.error = error
        super().__init__(str(error))


@dataclass(frozen=True)
class PathPolicy:
    """The directories a run may read from (`input_roots`, searched in order) and write under (`output_root`).

    `folders` are the folders of the documents whose paths this policy resolves (innermost template first); they
    lead `input_roots`. A policy for one node comes from `beside`.
    """

    input_roots: tuple[Path, ...] = field(default_factory=lambda: (Path.cwd(),))
    output_root: Path = field(default_factory=lambda: Path.cwd() / "output")
    folders: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        # resolved once here, so every check below compares against real directories without re-resolving
        folders = tuple(_resolved_root(folder, "document") for folder in self.folders)
        roots = (*folders, *(_resolved_root(root, "input") for root in self.input_roots))
        object.__setattr__(self, "folders", folders)
        object.__setattr__(self, "input_roots", tuple(dict.fromkeys(roots)))
        object.__setattr__(self, "output_root", _resolved_root(self.output_root, "output"))

    @classmethod
    def create(cls, input_dirs: list[str | Path] | None = None, output_dir: str | Path | None = None) -> PathPolicy:
        return cls(tuple(Path(d) for d in input_dirs or [Path.cwd()]),
                   Path(output_dir) if output_dir is not None else Path.cwd() / "output")

    def beside(self, folders: tuple[Path, ...]) -> PathPolicy:
        """This policy for a node of the documents in `folders` (innermost first): they are searched first."""
        return self if not folders else _beside(self, folders)

    def input_path(self, path: str, *, node: str | None = None, input: str | None = None,
                   directory: bool = False) -> Path:
        """The resolved path of an existing file (or, with `directory`, a file or folder) inside an input root."""
        written = Path(path)
        what = "file or folder" if directory else "file"
        candidates: list[tuple[Path | None, Path]] = [(None, written)] if written.is_absolute() else \
            [(root, root / written) for root in self.input_roots]
        inside: list[Path] = []
        for root, candidate in candidates:
            try:
                resolved = candidate.resolve()
                if not any(resolved.is_relative_to(root) for root in self.input_roots):
                    continue  # outside every root: whether it exists is nobody's business
                inside.append(resolved)
                if resolved.exists() if directory else resolved.is_file():
                    self._note_fallback(path, resolved, root, node, input)
                    return resolved
            except (OSError, ValueError, RuntimeError) as error:  # a NUL byte, an over-long name, a symlink loop
                raise PathError(GraphError(Code.FILE_NOT_FOUND, f"not a usable path: {error}", node, input,
                                           "an existing file", types.show_value(path))) from None
        if not inside:
            roots = ", ".join(str(root) for root in self.input_roots)
            raise PathError(GraphError(
                Code.PATH_OUTSIDE_ROOT, "the file is outside the input directories; "
                "add its directory with --input-dir to allow it", node, input, f"a path inside {roots}", path))
        kind = _kind_of(inside[0])
        problem = f"{inside[0]} is {kind}, not a {what}" if kind else f"no such {what}: {inside[0]}"
        if len(inside) > 1:
            problem += f" (nor in {', '.join(str(place.parent) for place in inside[1:])})"
        raise PathError(GraphError(Code.FILE_NOT_FOUND, problem, node, input, f"an existing {what}", path))

    def _note_fallback(self, path: str, resolved: Path, root: Path | None, node: str | None,
                       input: str | None) -> None:
        """Warn (once per file and document) when a document's relative path was found only in the current directory,
        as the rule before paths resolved against the document's folder had it."""
        if not self.folders or root is None or root in self.folders:
            return
        try:
            if root != Path.cwd().resolve():
                return
        except OSError:
            return
        folder = self.folders[-1]  # the outermost document: the one the user ran
        with _WARNED_LOCK:
            if (resolved, folder) in _WARNED or len(_WARNED) > 10_000:
                return
            _WARNED.add((resolved, folder))
        where = f"node '{node}', input '{input}'" if node else f"input '{input}'"
        log.warning("%s: '%s' was found relative to the current directory; relative paths now resolve against the "
                    "document's folder %s: write '%s' (or an absolute path) to keep it working from any directory",
                    where, path, folder, os.path.relpath(resolved, folder))

    def output_path(self, relative: str, *, node: str | None = None, input: str | None = None) -> Path:
        """The resolved path for a new file under the output root."""
        root = self.output_root
        try:
            resolved = (root / relative).resolve()
        except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: a symlink loop
            raise PathError(GraphError(Code.PATH_OUTSIDE_ROOT, f"not a usable path: {error}", node, input,
                                       f"a relative path inside {root}", types.show_value(relative))) from None
        if Path(relative).is_absolute() or not resolved.is_relative_to(root):
            raise PathError(GraphError(
                Code.PATH_OUTSIDE_ROOT, "outputs are written under the output directory; "
                "choose it with --out", node, input, f"a relative path inside {root}", relative))
        return resolved


def command_line_roots(input_dirs: list[Path] | None) -> list[Path]:
    """The input roots of a command (run, validate, sweep): every --input-dir, then the current directory, which
    `--input-dir` adds to and never drops (each document's folder comes first on its own)."""
    return [*(input_dirs or []), Path.cwd()]


_WARNED: set[tuple[Path, Path]] = set()  # (file, document folder) pairs already warned about: one line each
_WARNED_LOCK = threading.Lock()


@lru_cache(maxsize=256)
def _beside(policy: PathPolicy, folders: tuple[Path, ...]) -> PathPolicy:
    return PathPolicy(policy.input_roots, policy.output_root, (*folders, *policy.folders))


def _resolved_root(root: str | Path, kind: str) -> Path:
    """A root directory, resolved; one that cannot be (a symlink loop, a NUL byte) is refused by name."""
    try:
        return Path(root).resolve()
    except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: a symlink loop
        raise PathError(GraphError(Code.FILE_NOT_FOUND, f"the {kind} directory cannot be used: {error}",
                                   input=f"{kind} directory", expected="a directory", found=types.show_value(str(root)))
                        ) from None


def file_kind(mode: int) -> str | None:
    """What a file that is not a regular file is ("a directory", "a FIFO", ...), from its stat mode; else None."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def _kind_of(path: Path) -> str | None:
    """What stands at `path` when it is not a regular file, or None (also when nothing is there)."""
    try:
        return file_kind(path.stat().st_mode)
    except (OSError, ValueError):
        return None
