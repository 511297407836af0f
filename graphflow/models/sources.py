"""Where a model comes from: a Hugging Face hub id, a local diffusers folder, or one .safetensors file.

`tiny:NAME` names one of graphflow's tiny random-weight models (see graphflow.models.tiny),
built on first use: the offline demo and quick experiments run on them.

Local paths go through the run's PathPolicy, so they stay inside the input directories the user
allowed, and so does every file inside a model folder, symlinks followed (graphflow.models.contents);
a hub snapshot's files stay inside that repository's folder of the Hugging Face cache, a tiny
model's inside the tiny-models folder. Hub ids resolve to a snapshot folder in the Hugging Face
cache, downloading only the safetensors weights a loader needs when the hub is reachable. Pickle
formats are refused before anything reads them.

A local or tiny source is identified by the contents of its files (`fingerprint`, `ModelSource.key`),
a hub source by its cached revision. Weights load long after a source is located, so whatever
reads a source's files checks afterwards that they still hold what was keyed (`verified`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from graphflow import types
from graphflow.errors import Code, GraphError, GraphflowError
from graphflow.models.contents import Walk, content_fingerprint, list_files
from graphflow.paths import PathError, PathPolicy

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
TINY_PREFIX = "tiny:"
_HUB_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][\w.-]*/[\w.-]+$")  # the hub refuses "--" and ".." in ids
# what a hub snapshot needs: configs, tokenizers, and the non-variant safetensors weights; the first
# entry of each is the file that must be there for the snapshot to count as present
PIPELINE_FILES = ("model_index.json", "*/*.json", "*/*.txt", "*/diffusion_pytorch_model.safetensors",
                  "*/model.safetensors", "*/*.safetensors.index.json", "*/*-of-*.safetensors")
MODEL_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "*.safetensors.index.json",
               "diffusion_pytorch_model-*-of-*.safetensors")
# what diffusers reads from a single-file loader's `config` source (its own hub download takes the same patterns)
PIPELINE_CONFIG_FILES = ("model_index.json", "*.json", "*/*.json", "*.txt", "*/*.txt", "*/*.model")
MODEL_CONFIG_FILES = ("config.json",)
_EXPECTED = "a hub id, a model folder or .safetensors file inside the input directories, or tiny:NAME"
T = TypeVar("T")


class ModelNotFoundError(GraphflowError):
    """A model source is neither a usable local path nor a hub repository available here."""


class PickleRefusedError(GraphflowError):
    """The weights are in a pickle format, which graphflow never loads (unpickling runs code)."""


class ModelChangedError(GraphflowError):
    """A source's files changed while they were being read, so what was read is not what the source was keyed by."""


@dataclass(frozen=True)
class ModelSource:
    """A located model: `path` is a local folder (hub snapshots included) or a .safetensors file.

    `roots` are the folders its files must stay in; `fingerprint` identifies their contents (a hub
    source: "hub:REVISION"), and `files` holds each file's digest, to say which changed. Sources
    that differ only in how they were named are equal (what is read from them is remembered once).
    """

    name: str = field(compare=False)
    kind: Literal["hub", "folder", "file"]
    path: Path
    roots: tuple[Path, ...] = field(repr=False)
    fingerprint: str
    files: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)

    @property
    def key(self) -> str:
        """What identifies the source for the model manager: the hub id at its snapshot's revision, or the
        resolved local path with its fingerprint (so replaced weights load anew)."""
        if self.kind == "hub":
            return f"{self.name}@{self.path.name}"
        return f"{self.path}@{self.fingerprint}"

    def read_json(self, relative: str) -> dict[str, Any]:
        """A config file of the model; one that is missing or malformed is named, with what is wrong with it."""
        path = self.path / relative
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelNotFoundError(f"'{self.name}' has no readable {relative}: {path} ({error}); a diffusers folder "
                                     "holds the same files as the model's hub repository") from error
        if not isinstance(config, dict):
            raise ModelNotFoundError(f"'{self.name}': {path} is not a JSON object")
        return config

    def check_unchanged(self) -> None:
        """Call after reading the source's files: ModelChangedError if they no longer hold what the source was keyed
        by, PathError if one now leads outside the roots. A hub snapshot's revision fixes its contents."""
        walk = Walk(self.name, self.roots)
        files = list_files(self.path.resolve(), walk)
        if self.kind == "hub":
            return
        fingerprint, digests = content_fingerprint(files, walk)
        if fingerprint == self.fingerprint:
            return
        before, after = dict(self.files), dict(digests)
        changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
        raise ModelChangedError(
            f"the files of model '{self.name}' ({self.path}) changed while they were being read "
            f"({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}); nothing read from them is kept. "
            "Run again once they are complete to use the new files.")


@dataclass(frozen=True)
class Verified(Generic[T]):
    """`load`, then a check that none of `sources` changed meanwhile (so new weights never serve an old key). The
    handles made with one keep the `sources`: weights loaded from them stay memory-mapped to their files (as
    diffusers maps them, and as parity with its pipelines needs), so every node that used a model checks them
    again after it ran (graphflow.engine)."""

    load: Callable[[], T]
    sources: tuple[ModelSource, ...]

    def __call__(self) -> T:
        model = self.load()
        for source in self.sources:
            source.check_unchanged()
        return model


def verified(load: Callable[[], T], *sources: ModelSource) -> Verified[T]:
    return Verified(load, sources)


def fingerprint(name: str, paths: PathPolicy, *, node: str | None = None, input: str | None = None) -> str:
    """What identifies the files a loader would read for `name`: a digest of the contents of a local file or folder
    or tiny model (their bytes, whatever their sizes and times say), or the hub revision cached for a repository.

    "" when nothing loadable has that name (the loader then says why) and for a blank name (no source: an empty
    config input). PathError, before anything reads a file, when the source or a file inside it leads outside its
    roots, when it is an input directory itself, or when it holds symlink loops, odd files or too many entries.
    """
    name = name.strip()
    if not name:
        return ""
    try:
        return _local(name, paths, node, input).fingerprint
    except (ModelNotFoundError, PickleRefusedError):
        return ""  # refused by its loader before it reads anything, so there is nothing to key
    except PathError as error:
        if error.error.code != Code.FILE_NOT_FOUND:
            raise
    return _hub_fingerprint(name, node, input) if _HUB_ID.match(name) else ""


def locate(name: str, paths: PathPolicy, *, node: str, input: str, pipeline: bool = False,
           files: tuple[str, ...] | None = None) -> ModelSource:
    """Find `name` locally or on the hub.

    What a hub snapshot must hold: a whole checkpoint folder with `pipeline`, else one diffusers
    model, or exactly `files` (names or glob patterns; names without a wildcard must all exist).
    """
    wanted = files or (PIPELINE_FILES if pipeline else MODEL_FILES)
    name = name.strip()
    if not name:
        raise PathError(GraphError(Code.INVALID_VALUE, "no model source given", node, input, _EXPECTED, "''"))
    try:
        source = _local(name, paths, node, input)
    except PathError as error:
        if error.error.code != Code.FILE_NOT_FOUND:
            raise
        if not _HUB_ID.match(name) or Path(name).suffix == ".safetensors":
            raise ModelNotFoundError(_not_found(name, paths, str(error.error.message))) from None
        return _hub_source(name, _hub_snapshot(name, paths, wanted, required_files(wanted, files)), node, input)
    if files is not None and source.kind == "folder":
        missing = [file for file in required_files(wanted, files) if not (source.path / file).is_file()]
        if missing:
            raise ModelNotFoundError(f"model folder {source.path} lacks {', '.join(missing)}; a local copy must hold "
                                     f"the same files as the hub repository: {', '.join(files)}")
    return source


def _local(name: str, paths: PathPolicy, node: str | None, input: str | None) -> ModelSource:
    """The tiny model or local file or folder `name`; PathError with FILE_NOT_FOUND when there is none."""
    if name.startswith(TINY_PREFIX):
        return _tiny(name, node, input)
    refuse_pickle(Path(name))
    path = paths.input_path(name, node=node, input=input, directory=True)
    if any(root.is_relative_to(path) for root in paths.input_roots):  # walking it would read every input
        raise PathError(GraphError(
            Code.INVALID_VALUE, f"'{name}' is the input directory {path} itself, or holds one; name the model's own "
            "folder or file inside it", node, input, _EXPECTED, types.show_value(name)))
    if path.is_file() and path.suffix != ".safetensors":
        raise ModelNotFoundError(f"'{name}' is a {path.suffix or 'suffix-less'} file; single-file models must be "
                                 ".safetensors files (or give a diffusers folder or a hub id)")
    return _content_source(name, "file" if path.is_file() else "folder", path, paths.input_roots, node, input)


def _tiny(name: str, node: str | None, input: str | None) -> ModelSource:
    """`tiny:NAME`: one of graphflow's own tiny random-weight models, written on first use."""
    from graphflow.models.tiny import TINY_NAMES, default_tiny_models_dir, make_tiny_models

    model = name.removeprefix(TINY_PREFIX)
    if model not in TINY_NAMES:
        raise ModelNotFoundError(f"'{name}' is not a tiny model; graphflow's tiny models are "
                                 f"{', '.join(TINY_PREFIX + known for known in TINY_NAMES)}")
    folder = default_tiny_models_dir()
    if not (folder / model / ".complete").is_file():
        make_tiny_models(folder)
    return _content_source(name, "folder", (folder / model).resolve(), (folder.resolve(),), node, input)


def _content_source(name: str, kind: Literal["folder", "file"], path: Path, roots: tuple[Path, ...],
                    node: str | None, input: str | None) -> ModelSource:
    """A local source, its files checked inside `roots` and fingerprinted by content."""
    walk = Walk(name, roots, node, input)
    _require_inside(path, walk)
    fingerprint, digests = content_fingerprint(list_files(path, walk), walk)
    return ModelSource(name, kind, path, roots, fingerprint, digests)


def _hub_source(name: str, snapshot: Path, node: str | None, input: str | None) -> ModelSource:
    """A hub snapshot, each of its files checked to lie inside the repository's folder of the HF cache (its files
    are symlinks into ../../blobs)."""
    walk = Walk(name, (_hub_repository(name).resolve(),), node, input)
    _require_inside(snapshot.resolve(), walk)
    list_files(snapshot.resolve(), walk)
    return ModelSource(name, "hub", snapshot, walk.roots, f"hub:{snapshot.name}")


def _hub_fingerprint(name: str, node: str | None, input: str | None) -> str:
    """"hub:REVISION" for a repository cached here ("" for none), once its snapshot's files are checked."""
    repository = _hub_repository(name)
    try:
        revision = (repository / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        return ""
    snapshot = repository / "snapshots" / revision
    if snapshot.is_dir():
        _hub_source(name, snapshot, node, input)
    return f"hub:{revision}"


def _hub_repository(name: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}"


def _require_inside(path: Path, walk: Walk) -> None:
    if not walk.inside(path):
        roots = ", ".join(str(root) for root in walk.roots)
        raise walk.refuse(Code.PATH_OUTSIDE_ROOT, f"it resolves to {path}, outside {roots}",
                          f"a path inside {roots}", str(path))


def required_files(patterns: tuple[str, ...], files: tuple[str, ...] | None) -> list[str]:
    """The files a located folder must hold: every exact name asked for, else the patterns' marker file."""
    if files is None:
        return [patterns[0]]
    return [file for file in files if not _is_pattern(file)]


def _is_pattern(file: str) -> bool:
    return any(character in file for character in "*?[")


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefusedError(
            f"'{path}' is a pickle checkpoint ({path.suffix}); graphflow never unpickles weights because loading a "
            "pickle can run arbitrary code. Convert it to .safetensors (e.g. with diffusers' conversion scripts) "
            "or use the model's safetensors release.")


def require_safetensors(folder: Path, what: str) -> None:
    """Refuse a model folder whose weights exist only as pickle files; say so before a loader trips on it."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(file.name for file in folder.iterdir() if file.suffix in PICKLE_SUFFIXES) if folder.is_dir() \
        else []
    if pickles:
        refuse_pickle(folder / pickles[0])
    raise ModelNotFoundError(f"{what}: no .safetensors weights in {folder}")


def _hub_snapshot(repo: str, paths: PathPolicy, patterns: tuple[str, ...], required: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo, allow_patterns=list(patterns), local_files_only=True))
        if all((folder / file).is_file() for file in required):
            return folder
    except LocalEntryNotFoundError:
        pass
    patterned = any(map(_is_pattern, patterns))
    wanted = "--include " + " ".join(f"'{file}'" for file in patterns) if patterned else " ".join(patterns)
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(_not_found(repo, paths, f"it is not in the Hugging Face cache "
                                            f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set", wanted))
    try:
        folder = Path(snapshot_download(repo, allow_patterns=list(patterns)))
    except Exception as error:  # the hub client raises many types: network, auth, missing repo
        raise ModelNotFoundError(_not_found(repo, paths, f"downloading from the hub failed "
                                            f"({type(error).__name__}: {error})", wanted)) from error
    missing = [file for file in required if not (folder / file).is_file()]
    if missing:
        raise ModelNotFoundError(f"hub repository '{repo}' has no {', '.join(missing)}")
    return folder


def _not_found(name: str, paths: PathPolicy, why: str, files: str = "") -> str:
    roots = ", ".join(str(root) for root in paths.input_roots)
    download = f"hf download {name} {files}".rstrip()
    return (f"model '{name}' was not found: {why}. Looked for a local file or folder under {roots} and for a "
            "Hugging Face hub repository of that id in the cache. To supply it: download it while online "
            f"(`{download}` or any run with the hub reachable), or point this input at a local folder holding "
            "the same files, or a .safetensors file (add its directory with --input-dir).")
