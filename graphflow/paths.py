"""Where nodes may read and write: paths stay inside the roots the user allowed.

Relative paths resolve against the first input root (or the output root for writes). A path
that leaves its roots — through `..`, an absolute path or a symlink — is refused unless the
user widened the roots explicitly.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path

from graphflow import types
from graphflow.errors import Code, GraphError, GraphflowError


class PathError(GraphflowError):
    """A path is missing or outside the allowed roots."""

    def __init__(self, error: GraphError) -> None:
        self.error = error
        super().__init__(str(error))


@dataclass(frozen=True)
class PathPolicy:
    """The directories a run may read from (`input_roots`) and write under (`output_root`)."""

    input_roots: tuple[Path, ...] = field(default_factory=lambda: (Path.cwd(),))
    output_root: Path = field(default_factory=lambda: Path.cwd() / "output")

    def __post_init__(self) -> None:
        # resolved once here, so every check below compares against real directories without re-resolving
        object.__setattr__(self, "input_roots", tuple(_resolved_root(root, "input") for root in self.input_roots))
        object.__setattr__(self, "output_root", _resolved_root(self.output_root, "output"))

    @classmethod
    def create(cls, input_dirs: list[str | Path] | None = None, output_dir: str | Path | None = None) -> PathPolicy:
        return cls(tuple(Path(d) for d in input_dirs or [Path.cwd()]),
                   Path(output_dir) if output_dir is not None else Path.cwd() / "output")

    def input_path(self, path: str, *, node: str | None = None, input: str | None = None,
                   directory: bool = False) -> Path:
        """The resolved path of an existing file (or, with `directory`, a file or folder) inside an input root."""
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = self.input_roots[0] / candidate
        try:
            resolved = candidate.resolve()
            exists = resolved.exists() if directory else resolved.is_file()
        except (OSError, ValueError, RuntimeError) as error:  # a NUL byte, an over-long name, a symlink loop
            raise PathError(GraphError(Code.FILE_NOT_FOUND, f"not a usable path: {error}", node, input,
                                       "an existing file", types.show_value(path))) from None
        if not any(resolved.is_relative_to(root) for root in self.input_roots):
            roots = ", ".join(str(root) for root in self.input_roots)
            raise PathError(GraphError(
                Code.PATH_OUTSIDE_ROOT, "the file is outside the input directories; "
                "add its directory with --input-dir to allow it", node, input, f"a path inside {roots}", path))
        if not exists:
            what = "file or folder" if directory else "file"
            kind = _kind_of(resolved)
            problem = f"{resolved} is {kind}, not a {what}" if kind else f"no such {what}: {resolved}"
            raise PathError(GraphError(Code.FILE_NOT_FOUND, problem, node, input, f"an existing {what}", path))
        return resolved

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
