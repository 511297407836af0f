"""ComfyUI workflows as graphflow documents: `import_prompt` (API format), `import_file` (API or UI JSON, PNG).

ComfyUI wires nodes by position (`["4", 0]`: output 0 of node "4"); graphflow by name (`{"from": "ckpt_4.model"}`).
Each ComfyUI node becomes zero or more graphflow nodes named after its class and id (`ksampler_3`), and each of
its outputs a `Source`: the graphflow output it became plus what ComfyUI keeps in the value itself and graphflow
keeps elsewhere (a CLIPSetLastLayer's clip skip, the ControlNets attached to a conditioning, a latent's noise
mask). Every problem (unknown classes, bad links, missing model files) is collected and raised together.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphflow.comfy.checks import checked_order, node_ids, primitive_value, shown
from graphflow.comfy.classes import COMFY_CLASSES, ComfyClass, folder_files
from graphflow.errors import Code, GraphError, ValidationError, did_you_mean

if TYPE_CHECKING:
    from graphflow.registry import NodeRegistry

LEVELS = ("exact", "approximate", "unsupported")
_UNSAFE = re.compile(r"[^A-Za-z0-9_]+")


@dataclass(frozen=True)
class Fidelity:
    """How faithfully one ComfyUI node was imported: exact, approximate (`reason` says why) or unsupported."""

    level: str
    node_class: str
    graphflow_nodes: list[str]
    reason: str = ""


@dataclass
class Imported:
    """A ComfyUI workflow as a graphflow document, with what each ComfyUI node became."""

    document: dict[str, Any]
    fidelity: dict[str, Fidelity]  # by ComfyUI node id
    node_names: dict[str, list[str]]  # ComfyUI node id -> the graphflow nodes it became
    outputs: dict[str, str]  # ComfyUI id of each SaveImage / PreviewImage -> its graphflow node

    def fidelity_json(self) -> dict[str, dict[str, Any]]:
        """The fidelity records as JSON-ready objects, by ComfyUI node id."""
        return {comfy_id: asdict(item) for comfy_id, item in self.fidelity.items()}

    @property
    def comfy_ids(self) -> dict[str, str]:
        """graphflow node name -> the ComfyUI node id it came from (for progress events in ComfyUI's terms)."""
        return {name: comfy_id for comfy_id, made in self.node_names.items() for name in made}

    def summary(self) -> str:
        """A table of every ComfyUI node: id, class, fidelity, graphflow nodes, why it is not exact."""
        rows = [("id", "class", "fidelity", "graphflow", "notes")]
        for comfy_id, item in self.fidelity.items():
            rows.append((comfy_id, item.node_class, item.level, ", ".join(item.graphflow_nodes) or "-",
                         item.reason or ""))
        widths = [max(len(row[column]) for row in rows) for column in range(4)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
                 for row in rows]
        counts = {level: sum(item.level == level for item in self.fidelity.values()) for level in LEVELS}
        lines.append(f"{len(self.fidelity)} ComfyUI nodes: " + ", ".join(f"{counts[level]} {level}"
                                                                         for level in LEVELS))
        return "\n".join(line.rstrip() for line in lines)


@dataclass(frozen=True)
class Source:
    """What one ComfyUI output became: a graphflow output (`link`, "node.output") of ComfyUI type `type`, plus
    the parts of ComfyUI's value that graphflow carries on other inputs."""

    link: str
    type: str
    clip_skip: int = 0  # CLIP: from CLIPSetLastLayer, for TextEncode's clip_skip
    controls: tuple[str, ...] = ()  # CONDITIONING: ControlApply outputs, for the Sampler's control list
    mask: str | None = None  # LATENT: a noise mask (SetLatentNoiseMask), for the Sampler's mask
    empty: bool = False  # LATENT: an EmptyLatent's, which graphflow's Sampler samples as text-to-image

    def with_(self, **changes: Any) -> Source:
        return replace(self, **changes)


@dataclass
class Translation:
    """A ComfyUI node's graphflow result: its outputs in ComfyUI's order, and its fidelity."""

    outputs: tuple[Source, ...] = ()
    level: str = "exact"
    reason: str = ""


@dataclass
class Paths:
    """Where ComfyUI's file names resolve: its models folder (checkpoints/, loras/, ...) and its input folder."""

    models_dir: Path | None = None
    input_dir: Path | None = None


class NodeImport:
    """One ComfyUI node while it is translated: its inputs, resolved, and the graphflow nodes it adds."""

    def __init__(self, importer: _Importer, comfy_id: str, spec: ComfyClass, inputs: Mapping[str, Any]) -> None:
        self.importer = importer
        self.id = comfy_id
        self.spec = spec
        self.raw = inputs
        self.added: list[str] = []

    def name(self, suffix: str = "") -> str:
        """The graphflow node name for this node (or its `suffix` part): readable, deterministic, unique."""
        return self.importer.node_name(self.spec.name, self.id, suffix)

    def add(self, node_type: str, inputs: dict[str, Any], suffix: str = "") -> str:
        """Add a graphflow node; returns its name."""
        name = self.name(suffix)
        self.importer.nodes[name] = {"type": node_type, "inputs": inputs}
        self.added.append(name)
        return name

    def source(self, input: str) -> Source | None:
        """The Source linked into `input` (None for an unlinked optional input)."""
        value = self.raw.get(input)
        if value is None:
            return None
        return self.importer.sources[str(value[0])][int(value[1])]

    def link(self, input: str) -> dict[str, str]:
        source = self.source(input)
        assert source is not None, f"{self.spec.name}.{input} is required and was checked to be linked"
        return {"from": source.link}

    def value(self, input: str) -> Any:
        """A widget's value (its ComfyUI default where the workflow leaves it out)."""
        spec = self.spec.input(input)
        assert spec is not None, f"{self.spec.name} has no input {input}"
        value = self.raw.get(input)
        if isinstance(value, list):  # from a Primitive node, as the checks made sure
            value = primitive_value(self.importer.prompt[str(value[0])])
        return spec.default if value is None else value

    def model_path(self, input: str) -> str:
        """A model file name resolved against the models folder (ComfyUI's `folder/name`)."""
        spec = self.spec.input(input)
        assert spec is not None and spec.files is not None
        return self.importer.resolve_file(self, input, spec.files, str(self.value(input)))

    def image_path(self, input: str) -> str:
        """An image name resolved against the input folder; ComfyUI's ' [input]' annotation dropped."""
        name = re.sub(r" \[(input|output|temp)\]$", "", str(self.value(input)))
        return self.importer.resolve_file(self, input, "input", name)

    def error(self, code: Code, message: str, input: str | None = None, expected: str | None = None,
              found: str | None = None) -> None:
        self.importer.errors.append(GraphError(code, f"{self.spec.name} {message}", self.id, input, expected,
                                               found))


Translator = Callable[[NodeImport], Translation]


class _Importer:
    def __init__(self, prompt: Mapping[str, Any], paths: Paths, translators: Mapping[str, Translator]) -> None:
        self.prompt = {str(key): value for key, value in prompt.items()}
        self.paths = paths
        self.translators = translators
        self.errors: list[GraphError] = []
        self.nodes: dict[str, dict[str, Any]] = {}
        self.sources: dict[str, tuple[Source, ...]] = {}
        self._names: dict[tuple[str, str, str], str] = {}

    def node_name(self, class_name: str, comfy_id: str, suffix: str) -> str:
        key = (class_name, comfy_id, suffix)
        if key not in self._names:
            base = "_".join(part for part in (_snake(class_name), _UNSAFE.sub("_", comfy_id).strip("_"), suffix)
                            if part)
            name, count = base, 1
            while name in self._names.values():  # ids that differ only in unsafe characters ("1:2" and "1_2")
                count += 1
                name = f"{base}_{count}"
            self._names[key] = name
        return self._names[key]

    def resolve_file(self, node: NodeImport, input: str, folder: str, name: str) -> str:
        """`name` inside ComfyUI's `folder` (models) or input folder, as an absolute path when that folder is known.

        A model name whose file is missing may name a diffusers folder of the same stem (`sd15.safetensors` ->
        `sd15/`), as a checkpoint converted for diffusers would be kept. Windows separators are read as '/'.
        """
        root = self.paths.input_dir if folder == "input" else \
            self.paths.models_dir / folder if self.paths.models_dir is not None else None
        relative = Path(name.replace("\\", "/"))
        if not name or relative.is_absolute() or ".." in relative.parts:
            node.error(Code.PATH_OUTSIDE_ROOT, "names a file outside its folder", input,
                       f"a name inside ComfyUI's {folder}/ folder", repr(name))
            return name
        if root is None:  # resolved at run time against the first --input-dir
            return relative.as_posix() if folder == "input" else f"{folder}/{relative.as_posix()}"
        path = root / relative
        if not path.exists() and folder != "input" and (root / relative.with_suffix("")).is_dir():
            path = root / relative.with_suffix("")
        if not path.exists():
            known = folder_files(root, folder)
            node.error(Code.FILE_NOT_FOUND, f"names a file that is not in {root}{did_you_mean(name, known)}", input,
                       f"one of {', '.join(known[:8]) or 'the files there (none found)'}", repr(name))
        return str(path.absolute())

    def run(self) -> tuple[dict[str, dict[str, Any]], dict[str, Fidelity], dict[str, list[str]]]:
        order = checked_order(self.prompt)
        fidelity: dict[str, Fidelity] = {}
        names: dict[str, list[str]] = {}
        for comfy_id in order:
            entry = self.prompt[comfy_id]
            spec = COMFY_CLASSES[entry["class_type"]]
            node = NodeImport(self, comfy_id, spec, entry.get("inputs") or {})
            translation = self.translators[spec.name](node)
            self.sources[comfy_id] = translation.outputs
            names[comfy_id] = node.added
            fidelity[comfy_id] = Fidelity(translation.level, spec.name, list(node.added), translation.reason)
        if self.errors:
            raise ValidationError(self.errors)
        return self.nodes, {key: fidelity[key] for key in node_ids(self.prompt)}, \
            {key: names[key] for key in node_ids(self.prompt)}


def _snake(class_name: str) -> str:
    """KSampler -> ksampler, CheckpointLoaderSimple -> checkpoint_loader_simple, VAEDecode -> vae_decode."""
    words = re.findall(r"[A-Z]+(?=[A-Z][a-z]|\d|$)|[A-Z]?[a-z]+|\d+|[A-Z]+", class_name)
    if words and words[0] == "K" and len(words) > 1:  # KSampler: one word, as users say it
        words = ["K" + words[1], *words[2:]]
    return "_".join(word.lower() for word in words)


def import_prompt(prompt: dict[str, Any], *, models_dir: Path | None = None, name: str | None = None,
                  input_dir: Path | None = None, registry: NodeRegistry | None = None) -> Imported:
    """A ComfyUI API-format prompt (`{"3": {"class_type": ..., "inputs": {...}}}`) as a graphflow document.

    Model names resolve against `models_dir` (ComfyUI's layout: checkpoints/, controlnet/, loras/, vae/) and
    image names against `input_dir`; without them they stay relative (to the run's first --input-dir). Raises
    ValidationError listing every problem: unknown classes, bad links and values, missing files, and any
    problem graphflow's validation (with `registry`, default: the installed node packs) finds in the result.
    """
    from graphflow.comfy.mappings import TRANSLATORS

    if not isinstance(prompt, dict) or not prompt:
        raise ValidationError([GraphError(Code.INVALID_DOCUMENT, "a ComfyUI API-format prompt is a non-empty "
                                          "object of nodes by id", expected='{"3": {"class_type": ...}}',
                                          found=shown(prompt))])
    paths = Paths(models_dir, input_dir)
    nodes, fidelity, names = _Importer(prompt, paths, TRANSLATORS).run()
    document: dict[str, Any] = {"graphflow": 1, "name": name or "comfyui-import",
                                "description": "Imported from a ComfyUI workflow by graphflow import-comfy",
                                "nodes": nodes}
    outputs = {comfy_id: names[comfy_id][0] for comfy_id, item in fidelity.items()
               if COMFY_CLASSES[item.node_class].output_node and names[comfy_id]}
    _validate(document, registry, names, fidelity)
    return Imported(document, fidelity, names, outputs)


def _validate(document: dict[str, Any], registry: NodeRegistry | None, names: dict[str, list[str]],
              fidelity: dict[str, Fidelity]) -> None:
    """graphflow's validation of the result; its problems are reported at the ComfyUI node they came from."""
    from graphflow.registry import default_registry
    from graphflow.validation import validate_document

    errors = validate_document(document, registry if registry is not None else default_registry())
    comfy_ids = {name: comfy_id for comfy_id, made in names.items() for name in made}
    located = [replace(error, node=comfy_ids[error.node], message=f"{fidelity[comfy_ids[error.node]].node_class} "
                       f"(graphflow node {error.node}): {error.message}")
               if error.node in comfy_ids else error for error in errors]
    if located:
        raise ValidationError(located)


def import_file(path: Path, *, models_dir: Path | None = None, input_dir: Path | None = None,
                registry: NodeRegistry | None = None) -> Imported:
    """A ComfyUI workflow file as a graphflow document: API-format JSON, UI-format JSON (`nodes` / `links`), or a
    PNG ComfyUI saved (its `prompt` text chunk, else its `workflow` one)."""
    from graphflow.comfy.workflow import is_ui_workflow, prompt_from_ui, read_png_workflow

    path = Path(path)
    name = _document_name(path.stem)
    if path.suffix.lower() == ".png":
        data = read_png_workflow(path)
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise ValidationError([GraphError(Code.FILE_NOT_FOUND, f"cannot read {path}: {error}",
                                              expected="a readable ComfyUI workflow", found=str(path))]) from None
        except json.JSONDecodeError as error:
            raise ValidationError([GraphError(Code.INVALID_JSON, f"{path} is not JSON: {error}",
                                              expected="ComfyUI API or UI workflow JSON", found=str(path))]) from None
    if isinstance(data, dict) and is_ui_workflow(data):
        data = prompt_from_ui(data)
    return import_prompt(data, models_dir=models_dir, name=name, input_dir=input_dir, registry=registry)


def _document_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]+", "-", stem).strip("-") or "comfyui-import"


__all__ = ["Fidelity", "Imported", "NodeImport", "Source", "Translation", "import_file", "import_prompt"]
