"""Re-running the workflow a PNG embeds: what SaveImage writes into its text chunks, and how a run reads it back.

A PNG from SaveImage is self-contained: its `graphflow` chunk holds the document with every template inlined
(graphflow.inline), `params` the param values, `versions` the libraries that made it, and `run` the device,
dtype, model sources with their fingerprints and the seeds. `graphflow run image.png --set seed=8` and
`rerun_png` run it again; on the same machine they write the same pixels. What differs from this machine (a
library version, a model's files, the device) is a RerunWarning, not a failure.

The chunks are untrusted text: they are parsed as JSON data and checked like any document, never evaluated.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from graphflow.document import dumps, parse_document
from graphflow.errors import Code, GraphError, GraphflowError, ValidationError, printable
from graphflow.inline import inline_templates
from graphflow.types import show_value

if TYPE_CHECKING:
    from graphflow.context import RunContext
    from graphflow.engine import Engine, RunResult
    from graphflow.paths import PathPolicy
    from graphflow.registry import NodeRegistry

DOCUMENT_CHUNK, PARAMS_CHUNK, VERSIONS_CHUNK, RUN_CHUNK = "graphflow", "params", "versions", "run"
PACKAGES = ("graphflow", "torch", "diffusers", "transformers", "numpy", "pillow")
_COMFY_CHUNKS = ("prompt", "workflow")  # what ComfyUI's SaveImage writes
_MODELS_CHECKED = 64  # model sources compared with this machine's: a workflow uses a handful, a forged chunk more
_DEVICE = re.compile(r"cpu|mps|cuda(:[0-9]{1,3})?")  # the devices a recorded one may name, as --device takes them


class RerunWarning(UserWarning):
    """The PNG was made under other conditions than this run's: its pixels may differ."""


def is_png(path: str | Path) -> bool:
    """Whether `graphflow run` takes `path` for a PNG to re-run rather than for a document (by its name)."""
    return Path(path).suffix.lower() == ".png"


def package_versions() -> dict[str, str | None]:
    """The installed version of each of PACKAGES (None for one not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:  # graphflow run from a source checkout has no installed metadata
            versions[package] = None
    return versions


def png_text(ctx: RunContext) -> dict[str, str]:
    """The text chunks SaveImage writes: the self-contained document (when the run has one), the params, the
    library versions and the run record."""
    document, graph = ctx.document, ctx.graph
    if document is not None and graph is not None and graph.base_dir is not None:
        document = inline_templates(document, graph.base_dir, graph.template_documents, graph.template_references,
                                    functools.partial(_file_inputs, graph.registry))
    text = {} if document is None else {DOCUMENT_CHUNK: dumps(document)}
    text[PARAMS_CHUNK] = json.dumps(ctx.params, ensure_ascii=False)
    text[VERSIONS_CHUNK] = json.dumps(package_versions())
    text[RUN_CHUNK] = json.dumps(_run_record(ctx), ensure_ascii=False)
    return text


def _file_inputs(registry: NodeRegistry | None, type_name: str) -> frozenset[str]:
    node_type = registry.get(type_name) if registry is not None else None
    return frozenset(spec.name for spec in node_type.inputs if spec.file) if node_type is not None else frozenset()


def _run_record(ctx: RunContext) -> dict[str, Any]:
    """Device and dtype as they resolved, each model source with the fingerprint its loader's key holds, and the
    seeds given as literals (by the compiled node ids, `template_node/inner_node`)."""
    from graphflow.models.devices import placement

    where = placement(ctx.options)
    models: dict[str, str] = {}
    seeds: dict[str, Any] = {}
    graph = ctx.graph
    for (node_id, name), digest in ctx.digests.items() if graph is not None else ():
        node = graph.nodes.get(node_id)  # type: ignore[union-attr]
        source = node.inputs[name] if node is not None else None
        if node is not None and node.node_type.input_map[name].model and isinstance(source, str) and source.strip():
            models[source] = digest[len(repr(source)) + 1:]  # planning.model_digest: "'source'@fingerprint"
    for node in graph.nodes.values() if graph is not None else ():
        seed = node.inputs.get("seed")
        if all(isinstance(item, int) and not isinstance(item, bool)
               for item in (seed if isinstance(seed, list) else [seed])):
            seeds[node.id] = seed
    return {"device": where.device, "dtype": where.dtype, "models": models, "seeds": seeds}


@dataclass(frozen=True)
class PngWorkflow:
    """What a PNG from SaveImage records, read back and checked to be data of the expected shapes."""

    path: Path
    text: str  # the document's text, as in the chunk
    document: dict[str, Any]
    params: dict[str, Any]
    versions: dict[str, str | None]
    device: str | None
    dtype: str | None
    models: dict[str, str]  # model source -> fingerprint


def read_png(path: str | Path) -> PngWorkflow:
    """The workflow a PNG embeds; a ValidationError that says why when the file holds none, or a broken one."""
    path = Path(path)
    chunks = _text_chunks(path)
    if DOCUMENT_CHUNK not in chunks:
        raise ValidationError([_no_workflow(path, chunks)])
    source = f"{path} (its '{DOCUMENT_CHUNK}' text chunk)"
    text = chunks[DOCUMENT_CHUNK]
    document = parse_document(text, source)
    params = _json_object(chunks, PARAMS_CHUNK, path)
    versions = {name: value for name, value in _json_object(chunks, VERSIONS_CHUNK, path).items()
                if isinstance(value, str) or value is None}
    run = _json_object(chunks, RUN_CHUNK, path)
    models = run.get("models") if isinstance(run.get("models"), dict) else {}
    return PngWorkflow(path, text, document, params, versions, _text_or_none(run.get("device")),
                       _text_or_none(run.get("dtype")),
                       {name: value for name, value in models.items() if isinstance(value, str)})


def _text_chunks(path: Path) -> dict[str, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path, formats=["PNG"]) as picture:
            # the chunks before the pixel data, where SaveImage and ComfyUI write theirs: no pixel is decoded
            return {key: value for key, value in picture.info.items()
                    if isinstance(key, str) and isinstance(value, str)}
    except FileNotFoundError:
        raise ValidationError([GraphError(Code.FILE_NOT_FOUND, f"no file at {path}", expected="a PNG file",
                                          found=str(path))]) from None
    except UnidentifiedImageError:
        raise ValidationError([_error(path, "is not a PNG file", "a PNG written by graphflow's SaveImage",
                                      "another kind of file")]) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # Pillow's malformed-file kinds
        raise ValidationError([_error(path, f"is not a readable PNG ({type(error).__name__}: {error})",
                                      "a PNG written by graphflow's SaveImage", "a broken PNG")]) from None


def _no_workflow(path: Path, chunks: Mapping[str, str]) -> GraphError:
    if any(name in chunks for name in _COMFY_CHUNKS):
        how = ("convert it first: `graphflow import-comfy " + str(path) + " -o G.json`, then `graphflow run G.json`"
               if importlib.util.find_spec("graphflow.comfy") is not None else
               "graphflow runs its own documents, not ComfyUI's workflows")
        return _error(path, f"was written by ComfyUI (it has a '{'/'.join(n for n in _COMFY_CHUNKS if n in chunks)}' "
                      f"text chunk, not graphflow's '{DOCUMENT_CHUNK}'): {how}", f"a '{DOCUMENT_CHUNK}' text chunk",
                      "a ComfyUI workflow")
    found = ", ".join(f"'{name}'" for name in sorted(chunks)[:8]) or "none"
    return _error(path, f"holds no graphflow workflow: SaveImage writes it in a '{DOCUMENT_CHUNK}' text chunk, and "
                  "this PNG has none (made elsewhere, or its text was stripped)", f"a '{DOCUMENT_CHUNK}' text chunk",
                  f"text chunks {found}")


def _json_object(chunks: Mapping[str, str], name: str, path: Path) -> dict[str, Any]:
    """The JSON object in chunk `name` ({} when the chunk is absent), checked like document data."""
    from graphflow.document import shape_errors

    if name not in chunks:
        return {}
    try:
        value = json.loads(chunks[name])
    except (ValueError, RecursionError) as error:
        raise ValidationError([_error(path, f"has a '{name}' text chunk that is not JSON ({error})", "a JSON object",
                                      show_value(chunks[name][:40]), Code.INVALID_JSON)]) from None
    if not isinstance(value, dict):
        raise ValidationError([_error(path, f"has a '{name}' text chunk that is not a JSON object", "a JSON object",
                                      show_value(value), Code.INVALID_JSON)])
    problems = shape_errors(value)
    if problems:
        raise ValidationError(problems)
    return value


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _error(path: Path, problem: str, expected: str, found: str, code: Code = Code.INVALID_DOCUMENT) -> GraphError:
    return GraphError(code, f"{path} {problem}", expected=expected, found=found)


def rerun_options(workflow: PngWorkflow, options: Mapping[str, Any], paths: PathPolicy) -> dict[str, Any]:
    """The run options for re-running `workflow`: the recorded device and dtype where `options` leave them to
    `auto`; a RerunWarning for each thing that differs from when the PNG was made."""
    from graphflow.models.devices import DTYPES, resolve_device

    chosen = dict(options)
    made = workflow.path.name
    device, dtype = chosen.get("device") or "auto", chosen.get("dtype") or "auto"
    known = workflow.device is not None and _DEVICE.fullmatch(workflow.device) is not None
    if device == "auto" and known:
        try:
            resolve_device(workflow.device)
            chosen["device"] = workflow.device
        except RuntimeError as error:
            _warn(f"{made} was made on {workflow.device}, which this machine lacks ({error}); running on the "
                  "default device instead: pixels may differ")
    elif workflow.device and device != workflow.device:
        _warn(f"{made} was made on {show_value(workflow.device)}; running on {device}: pixels may differ")
    if dtype == "auto" and workflow.dtype in DTYPES:
        chosen["dtype"] = workflow.dtype
    elif workflow.dtype and dtype != workflow.dtype:
        _warn(f"{made} was made in {show_value(workflow.dtype)}; running in {dtype}: pixels may differ")
    for message in _differences(workflow, paths):
        _warn(message)
    return chosen


def _differences(workflow: PngWorkflow, paths: PathPolicy) -> list[str]:
    """The library versions and model files that differ from what made the PNG."""
    from graphflow.models.sources import fingerprint

    made = workflow.path.name
    now = package_versions()
    messages = [f"{made} was made with {package} {workflow.versions[package]}; this machine has "
                f"{now[package] or 'none installed'}: pixels may differ"
                for package in PACKAGES if package in workflow.versions and workflow.versions[package] != now[package]]
    for source, recorded in list(workflow.models.items())[:_MODELS_CHECKED]:
        try:
            current = fingerprint(source, paths)
        except (GraphflowError, OSError) as error:
            messages.append(f"model {source!r} of {made} cannot be checked here: {error}")
            continue
        if current != recorded:
            state = "is not found here" if not current else "has other files here than when it was made"
            messages.append(f"model {source!r} of {made} {state} (fingerprint {recorded[:16] or 'none'}, now "
                            f"{current[:16] or 'none'}): pixels may differ")
    return messages


def _warn(message: str) -> None:
    warnings.warn(message, RerunWarning, stacklevel=4)


def rerun_png(path: str | Path, overrides: Mapping[str, Any] | None = None, *, engine: Engine | None = None,
              **run: Any) -> RunResult:
    """Run the workflow PNG `path` embeds again, with `overrides` for its params (as `--set`); `run` takes the
    other keywords of Engine.run (outputs, on_event, cancel, options). The same as `graphflow run image.png`."""
    from graphflow.engine import Engine

    return (engine if engine is not None else Engine()).run(path, overrides, **run)


def run_document(path: str | Path) -> dict[str, Any]:
    """The document `graphflow run PATH` runs: the file's, or for a PNG the one it embeds (for parsing `--set`)."""
    from graphflow.document import load_document

    return read_png(path).document if is_png(path) else load_document(path)


@contextlib.contextmanager
def warnings_as_lines(stream: TextIO) -> Iterator[None]:
    """Inside: each RerunWarning is one `warning: ...` line on `stream` (the command line's way), every time."""
    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, RerunWarning):
            print(f"warning: {printable(str(message), limit=None)}", file=stream)
        else:
            shown(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("always", RerunWarning)
        shown = warnings.showwarning
        warnings.showwarning = show
        yield
