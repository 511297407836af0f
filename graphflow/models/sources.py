"""Where a model comes from: a Hugging Face hub id, a local diffusers folder, or one .safetensors file.

`tiny:NAME` names one of graphflow's tiny random-weight models (see graphflow.models.tiny),
built on first use: the offline demo and quick experiments run on them.

Local paths go through the run's PathPolicy, so they stay inside the input directories the user
allowed. Hub ids resolve to a snapshot folder in the Hugging Face cache, downloading only the
safetensors weights a loader needs when the hub is reachable. Pickle formats are refused before
anything reads them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from graphflow.errors import Code, GraphflowError
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


class ModelNotFoundError(GraphflowError):
    """A model source is neither a usable local path nor a hub repository available here."""


class PickleRefusedError(GraphflowError):
    """The weights are in a pickle format, which graphflow never loads (unpickling runs code)."""


# the files loaders read: configs, tokenizers, weights (annotators' .pth and .pt through the weights-only unpickler)
_FINGERPRINTED = frozenset({".json", ".safetensors", ".txt", ".model", ".pth", ".pt"})


def fingerprint(name: str, paths: PathPolicy) -> str:
    """What changes when a source's files change: the sizes and modification times of a local file or
    folder's model files, or the hub revision cached for a repository. "" when it cannot be found (the
    loader then says why). Cheap: nothing is read but file metadata and one ref file."""
    name = name.strip()
    if name.startswith(TINY_PREFIX):
        try:  # built here on first use, not in the loader: a fingerprint of files not yet written would change
            return _stat_fingerprint(_tiny(name).path)  # once they are, and re-run everything the next time
        except ModelNotFoundError:
            return ""
    try:
        return _stat_fingerprint(paths.input_path(name, directory=True))
    except PathError:
        pass
    if not _HUB_ID.match(name):
        return ""
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "refs" / "main"
    try:
        return "hub:" + ref.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def _stat_fingerprint(path: Path) -> str:
    files = [path] if path.is_file() else sorted(file for file in path.rglob("*")
                                                  if file.suffix in _FINGERPRINTED and file.is_file())
    entries = []
    for file in files:
        stat = file.stat()
        entries.append(f"{file.relative_to(path) if file != path else file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.blake2b("\n".join(entries).encode(), digest_size=12).hexdigest()


@dataclass(frozen=True)
class ModelSource:
    """A located model: `path` is a local folder (hub snapshots included) or a .safetensors file."""

    name: str
    kind: Literal["hub", "folder", "file"]
    path: Path

    @cached_property
    def key(self) -> str:
        """What identifies the source for the model manager: the hub id at its snapshot's revision, or the
        resolved local path with its files' sizes and times (so replaced weights load anew)."""
        if self.kind == "hub":
            return f"{self.name}@{self.path.name}"
        return f"{self.path}@{_stat_fingerprint(self.path)}"

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


def locate(name: str, paths: PathPolicy, *, node: str, input: str, pipeline: bool = False,
           files: tuple[str, ...] | None = None) -> ModelSource:
    """Find `name` locally or on the hub.

    What a hub snapshot must hold: a whole checkpoint folder with `pipeline`, else one diffusers
    model, or exactly `files` (names or glob patterns; names without a wildcard must all exist).
    """
    wanted = files or (PIPELINE_FILES if pipeline else MODEL_FILES)
    name = name.strip()
    if name.startswith(TINY_PREFIX):
        return _tiny(name)
    refuse_pickle(Path(name))
    try:
        path = paths.input_path(name, node=node, input=input, directory=True)
    except PathError as error:
        if error.error.code == Code.PATH_OUTSIDE_ROOT:
            raise
        if not _HUB_ID.match(name) or Path(name).suffix == ".safetensors":
            raise ModelNotFoundError(_not_found(name, paths, str(error.error.message))) from None
        return ModelSource(name, "hub", _hub_snapshot(name, paths, wanted, required_files(wanted, files)))
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelNotFoundError(f"'{name}' is a {path.suffix or 'suffix-less'} file; single-file models must be "
                                     ".safetensors files (or give a diffusers folder or a hub id)")
        return ModelSource(name, "file", path)
    if files is not None:
        missing = [file for file in required_files(wanted, files) if not (path / file).is_file()]
        if missing:
            raise ModelNotFoundError(f"model folder {path} lacks {', '.join(missing)}; a local copy must hold the "
                                     f"same files as the hub repository: {', '.join(files)}")
    return ModelSource(name, "folder", path)


def required_files(patterns: tuple[str, ...], files: tuple[str, ...] | None) -> list[str]:
    """The files a located folder must hold: every exact name asked for, else the patterns' marker file."""
    if files is None:
        return [patterns[0]]
    return [file for file in files if not _is_pattern(file)]


def _is_pattern(file: str) -> bool:
    return any(character in file for character in "*?[")


def _tiny(name: str) -> ModelSource:
    """`tiny:NAME`: one of graphflow's own tiny random-weight models, written on first use."""
    from graphflow.models.tiny import TINY_NAMES, default_tiny_models_dir, make_tiny_models

    model = name.removeprefix(TINY_PREFIX)
    if model not in TINY_NAMES:
        raise ModelNotFoundError(f"'{name}' is not a tiny model; graphflow's tiny models are "
                                 f"{', '.join(TINY_PREFIX + known for known in TINY_NAMES)}")
    folder = default_tiny_models_dir()
    if not (folder / model / ".complete").is_file():
        make_tiny_models(folder)
    return ModelSource(name, "folder", folder / model)


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
