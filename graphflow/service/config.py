"""What one `graphflow serve` process is configured with, and the templates it offers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphflow.document import load_document
from graphflow.errors import GraphflowError
from graphflow.node import REQUIRED
from graphflow.templates import parse_params

# run options a job may set for itself; the device, pixel limits and compile settings are the server's
JOB_OPTIONS = ("dtype", "vae_tiling", "vae_tile_size", "vae_slicing", "attention_slicing", "swap_controlnets")


@dataclass(frozen=True)
class ServiceConfig:
    """The data folder, the template folder, the input roots and the engines' settings."""

    data: Path
    graphs: Path
    input_dirs: tuple[Path, ...] = ()
    workers: int = 1  # workers on options["device"]; ignored when `devices` is given
    devices: tuple[str, ...] = ()  # one worker per entry, each running on that device ("cuda:0", "cpu", ...)
    options: dict[str, Any] = field(default_factory=dict)  # the engines' run options (device, dtype, memory, ...)
    cache_bytes: int = 2 << 30
    model_memory_bytes: int | None = None
    offload: str = "none"
    plugins: tuple[str, ...] = ()
    requeue: bool = False
    upload_bytes: int = 32 << 20
    upload_pixels: int = 8192 * 8192
    body_bytes: int = 4 << 20  # every request but uploads
    models_dir: Path | None = None  # ComfyUI's models folder layout (checkpoints/, controlnet/, ...) for POST /prompt
    backend: str = "local"  # "ray": the workers are Ray actors (graphflow.service.ray_workers), `workers` of them
    ray_address: str | None = None  # a running Ray cluster; None: one started on this machine
    ray_actors: int | None = None  # with backend "ray": how many actors (None: one per GPU, else per CPU)

    def worker_devices(self) -> tuple[str, ...]:
        """The device of each worker, in order: `devices`, else `workers` times the options' device."""
        return self.devices or (str(self.options.get("device") or "auto"),) * self.workers

    @property
    def uploads(self) -> Path:
        return self.data / "uploads"

    @property
    def results(self) -> Path:
        return self.data / "results"

    @property
    def outputs(self) -> Path:
        return self.data / "outputs"

    @property
    def database(self) -> Path:
        return self.data / "queue.db"

    def input_roots(self) -> list[Path]:
        """Where documents may read files: the --input-dir folders (the first resolves relative paths), the upload
        folder, the template folder and the --models-dir folder."""
        return [*self.input_dirs, self.uploads, self.graphs, *([self.models_dir] if self.models_dir else [])]

    def prepare(self) -> None:
        for folder in (self.data, self.uploads, self.results, self.outputs):
            folder.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class TemplateInfo:
    """One template the service offers: its name (the file name without .json), file, description, params and the
    document as loaded (shared by every request: read it, never change it)."""

    name: str
    path: Path
    description: str
    params: dict[str, dict[str, Any]]
    document: dict[str, Any]


class TemplateFolder:
    """The documents directly in one folder, by name; each file is parsed again only when it changes (its
    modification time or size), so a request lists the folder without re-reading every template."""

    def __init__(self, graphs: Path) -> None:
        self.graphs = graphs
        self._parsed: dict[Path, tuple[tuple[int, int], TemplateInfo | None]] = {}

    def templates(self) -> dict[str, TemplateInfo]:
        """The templates now in the folder; a file that is not a valid document is left out."""
        found: dict[str, TemplateInfo] = {}
        parsed: dict[Path, tuple[tuple[int, int], TemplateInfo | None]] = {}
        for path in sorted(self.graphs.glob("*.json")):
            try:
                status = path.stat()
            except OSError:
                continue
            stamp = (status.st_mtime_ns, status.st_size)
            known = self._parsed.get(path)
            info = known[1] if known is not None and known[0] == stamp else _template_info(path)
            parsed[path] = (stamp, info)
            if info is not None:
                found[path.stem] = info
        self._parsed = parsed  # one assignment: a request on another thread sees the old map or the new one
        return found

    def path(self, name: str) -> Path | None:
        """The file of the template `name`; None when the folder has no such (valid) template."""
        info = self.templates().get(name)
        return info.path if info is not None else None


def _template_info(path: Path) -> TemplateInfo | None:
    try:
        document = load_document(path)
    except (GraphflowError, OSError, json.JSONDecodeError):
        return None
    specs, _ = parse_params(document)
    description = document.get("description", "")
    return TemplateInfo(path.stem, path, description if isinstance(description, str) else "",
                        {name: _param_json(spec) for name, spec in specs.items()}, document)


def _param_json(spec: Any) -> dict[str, Any]:
    described: dict[str, Any] = {"type": spec.type, "list": spec.list, "description": spec.description,
                                 "required": spec.default is REQUIRED}
    extras = {"default": None if spec.default is REQUIRED else spec.default, "min": spec.min, "max": spec.max,
              "choices": list(spec.choices) if spec.choices is not None else None}
    return described | {key: value for key, value in extras.items() if value is not None}
