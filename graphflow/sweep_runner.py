"""Running a sweep: every job of a batch on a backend, each job's files in its own folder under `out`, the
summary in `out/sweep.json`, and a contact sheet of the pictures.

    result = run_sweep("graphs/controlnet_canny.json", sweep_batch(document, grid=["seed=0..3"]), "sweep-out")

The local backend runs the jobs one after another on one Engine, so the nodes they share (loaders, edge maps,
prompt encodings) run once for the whole sweep. Output nodes write under the engine's output root; each job's
files are then moved (never copied over anything) into the job's folder, keeping their names.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from graphflow.atomic import atomic_write
from graphflow.batches import Batch, expand, param_errors
from graphflow.document import load_document
from graphflow.errors import Code, GraphError, GraphflowError, ValidationError
from graphflow.events import CancelToken, Event
from graphflow.sweeps import job_folder, varied_names

if TYPE_CHECKING:
    from graphflow.engine import Engine, RunResult

SUMMARY = "sweep.json"
CONTACT_SHEET = "contact_sheet.png"


@dataclass(frozen=True)
class Job:
    """One job of a sweep: its index, its full param values, and its folder (relative to the sweep's out)."""

    index: int
    params: dict[str, Any]
    folder: str


@dataclass(frozen=True)
class JobRecord:
    """A finished job: its files (relative to the sweep's out), which nodes ran and which came from cache."""

    job: Job
    files: list[str]
    ran: list[str]
    cached: list[str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"index": self.job.index, "folder": self.job.folder, "params": self.job.params, "files": self.files,
                "ran": self.ran, "cached": self.cached, "seconds": round(self.seconds, 3)}


@dataclass
class SweepResult:
    """What a sweep produced, job by job in index order; `complete` is False when it stopped early."""

    template: Path
    out: Path
    varied: list[str]
    total: int
    jobs: list[JobRecord] = field(default_factory=list)
    complete: bool = False
    contact_sheet: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"template": str(self.template), "varied": self.varied, "total": self.total, "complete": self.complete,
                "contact_sheet": CONTACT_SHEET if self.contact_sheet else None,
                "jobs": [record.to_json() for record in sorted(self.jobs, key=lambda r: r.job.index)]}


JobEventHandler = Callable[[Job, Event], None]


class Backend(Protocol):
    """Where a sweep's jobs run. `run` writes each job's files under `out / job.folder` and yields each JobRecord
    as its job finishes (in any order); it stops at the first failure or when `cancel` is set."""

    def run(self, template: Path, jobs: Sequence[Job], out: Path, *, on_event: JobEventHandler | None,
            cancel: CancelToken) -> Iterator[JobRecord]: ...


class LocalBackend:
    """The jobs one after another on one Engine (by default one whose output root is the sweep's out)."""

    def __init__(self, engine: Engine | None = None, options: Mapping[str, Any] | None = None) -> None:
        self.engine = engine
        self.options = dict(options or {})

    def run(self, template: Path, jobs: Sequence[Job], out: Path, *, on_event: JobEventHandler | None,
            cancel: CancelToken) -> Iterator[JobRecord]:
        from graphflow.engine import Engine

        engine = self.engine if self.engine is not None else Engine(output_dir=out)
        writes_files = bool(engine.compile(template, jobs[0].params).output_nodes()) if jobs else False
        for job in jobs:
            cancel.check()
            handler = None if on_event is None else (lambda event, job=job: on_event(job, event))
            result = engine.run(template, job.params, on_event=handler, cancel=cancel, options=self.options)
            folder = out / job.folder
            if writes_files:
                kept = [_move(path, engine.paths.output_root, folder) for path in result.files]
            else:
                kept = _write_images(result, job.params, folder)
            yield JobRecord(job, [path.relative_to(out).as_posix() for path in kept], result.ran, result.cached,
                            result.seconds)


def _move(path: Path, root: Path, folder: Path) -> Path:
    """Move a file an output node wrote under `root` to the same place under `folder`; never replaces a file."""
    target = folder / (path.relative_to(root) if path.is_relative_to(root) else path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(path, target)  # FileExistsError rather than replacing
    except FileExistsError:
        raise
    except OSError:
        # another file system (a user's engine writing elsewhere), or one without hard links (FAT, some network
        # shares): copied whole, then removed
        if not atomic_write(target, path.read_bytes(), exclusive=True):
            raise FileExistsError(f"{target} already exists") from None
    path.unlink()
    with contextlib.suppress(OSError):  # folders a prefix such as "renders/room" made, now empty
        for parent in path.parents:
            if parent == root or not parent.is_relative_to(root):
                break
            parent.rmdir()
    return target


def _write_images(result: RunResult, params: Mapping[str, Any], folder: Path) -> list[Path]:
    """A graph without output nodes: each IMAGE output written into `folder` as NAME_00000.png, ..."""
    written = []
    for name, data in image_files(result, params):
        path = folder / name
        if not atomic_write(path, data, exclusive=True):
            raise FileExistsError(f"{path} already exists")
        written.append(path)
    return written


def image_files(result: RunResult, params: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """The files a graph without output nodes gives in a sweep: each IMAGE output as NAME_00000.png, NAME_00001.png,
    ... (names and PNG bytes)."""
    from graphflow.contact_sheet import image_pngs, is_image

    return [(f"{name}_{number:05d}.png", data) for name, value in result.outputs.items() if is_image(value)
            for number, data in enumerate(image_pngs(value, params))]


def plan_sweep(template: str | Path, batch: Batch, out: str | Path, engine: Engine | None = None) -> list[Job]:
    """The jobs of the sweep, after every check that can be made before anything runs: each value against the
    template's params, the template compiled once (with the first job's values), and no job folder already under
    `out`. ValidationError listing every problem."""
    from graphflow.engine import Engine

    document = load_document(template)
    errors = param_errors(batch, document)
    if errors:
        raise ValidationError(errors)
    values = expand(batch)
    width = max(4, len(str(len(values) - 1)))
    varied = varied_names(batch)
    jobs = [Job(index, params, job_folder(index, {name: params[name] for name in varied}, width))
            for index, params in enumerate(values)]
    if jobs:
        compiled = (engine if engine is not None else Engine()).compile(template, jobs[0].params)
        if not compiled.output_nodes():
            _check_file_names(list(compiled.outputs))
    taken = [name for name in (SUMMARY, *(job.folder for job in jobs)) if (Path(out) / name).exists()]
    if taken:
        raise ValidationError([GraphError(
            Code.INVALID_VALUE, f"{out} already holds an earlier sweep's results; choose another --out or remove "
            "them", input="out", expected="an output folder without them",
            found=", ".join(taken[:3]) + (", ..." if len(taken) > 3 else ""))])
    return jobs


def _check_file_names(outputs: list[str]) -> None:
    """A graph without output nodes has its IMAGE outputs written as NAME_00000.png into each job's folder: an
    output name holding a path separator ("../../x", which documents allow) would write outside it."""
    bad = [name for name in outputs if any(part in name for part in ("/", "\\", "\0"))]
    if bad:
        raise ValidationError([GraphError(
            Code.INVALID_VALUE, "a graph without output nodes has its outputs written as NAME_00000.png in each "
            "job's folder; this output's name would write outside it", input="outputs",
            expected="an output name without / or \\", found=name) for name in bad])


def run_sweep(template: str | Path, batch: Batch, out: str | Path, *, engine: Engine | None = None,
              backend: Backend | None = None, options: Mapping[str, Any] | None = None,
              on_job: Callable[[JobRecord], None] | None = None, on_event: JobEventHandler | None = None,
              cancel: CancelToken | None = None) -> SweepResult:
    """Run every job of `batch` on `template`, each writing into its folder under `out`; `sweep.json` there lists
    the finished jobs after each one (also when the sweep stops: a failure or Ctrl-C re-raises after writing it),
    and `contact_sheet.png` shows their pictures. `engine` and `options` go to the default LocalBackend."""
    from graphflow.engine import Engine

    out = Path(out)
    if backend is None:
        engine = engine if engine is not None else Engine(output_dir=out)
        backend = LocalBackend(engine, options)
    jobs = plan_sweep(template, batch, out, engine)
    result = SweepResult(Path(template), out, varied_names(batch), len(jobs))
    out.mkdir(parents=True, exist_ok=True)
    try:
        for record in backend.run(Path(template), jobs, out, on_event=on_event, cancel=cancel or CancelToken()):
            result.jobs.append(record)
            _write_summary(result)
            if on_job is not None:
                on_job(record)
        result.complete = True
        result.contact_sheet = _contact_sheet(result, batch)
    finally:
        _write_summary(result)
    return result


def _write_summary(result: SweepResult) -> None:
    atomic_write(result.out / SUMMARY, (json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
                 .encode("utf-8", "surrogatepass"))


def _contact_sheet(result: SweepResult, batch: Batch) -> Path | None:
    from graphflow.contact_sheet import Cell, write_contact_sheet

    cells = []
    for record in sorted(result.jobs, key=lambda r: r.job.index):
        pictures = [name for name in record.files if name.lower().endswith(".png")]
        label = tuple(f"{name}={_shown(record.job.params[name])}" for name in result.varied)
        cells += [Cell(result.out / name, label + ((Path(name).name,) if len(pictures) > 1 else ()))
                  for name in pictures]
    last_group = len(next(iter(batch.groups[-1].values()))) if len(batch.groups) > 1 else None
    one_each = len(cells) == len(result.jobs)
    return write_contact_sheet(cells, result.out / CONTACT_SHEET, last_group if one_each else None)


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def summary_table(result: SweepResult) -> str:
    """The finished jobs as a text table: index, the varied params, ran / cached counts, seconds, files."""
    header = ["#", *result.varied, "ran", "cached", "s", "files"]
    rows = [[str(r.job.index), *(_shown(r.job.params[name]) for name in result.varied), str(len(r.ran)),
             str(len(r.cached)), f"{r.seconds:.2f}", ", ".join(r.files) or "-"]
            for r in sorted(result.jobs, key=lambda r: r.job.index)]
    widths = [min(40, max(len(row[column]) for row in [header, *rows])) for column in range(len(header) - 1)]
    lines = ["  ".join([*(cell[:40].ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]])
             for row in [header, *rows]]
    ran = sum(len(r.ran) for r in result.jobs)
    cached = sum(len(r.cached) for r in result.jobs)
    lines.append(f"{len(result.jobs)} of {result.total} jobs: {ran} nodes ran, {cached} from cache")
    return "\n".join(lines)


class BackendUnavailable(GraphflowError):
    """The backend a sweep asked for cannot run here (its optional extra is not installed)."""


class JobFailed(GraphflowError):
    """A job could not finish for another reason than a node's error (on Ray: it kept killing its actor); the
    command line exits with the code of a failed run, not an invalid document's."""


BACKENDS = ("local", "ray")


def make_backend(name: str, *, address: str | None = None, engine: Engine | None = None,
                 options: Mapping[str, Any] | None = None, plugins: Sequence[str] = (),
                 actors: int | None = None, threads: int | None = None) -> Backend:
    """The backend called `name`: "local" (one Engine here) or "ray" (the `graphflow[ray]` extra: `address` of a
    running cluster, else a local one; `actors` and `threads` per CPU actor as graphflow.ray_backend.RayBackend
    takes them; its actors build their Engines from `engine`'s settings and `plugins`). BackendUnavailable when it
    cannot run here."""
    if name == "local":
        if address is not None or actors is not None or threads is not None:
            raise BackendUnavailable("--address, --actors and --threads-per-actor go with --backend ray")
        return LocalBackend(engine, options)
    if name != "ray":
        raise BackendUnavailable(f"no sweep backend '{name}'; expected one of {', '.join(BACKENDS)}")
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise BackendUnavailable("--backend ray needs Ray, from the graphflow[ray] extra: "
                                 "pip install 'graphflow[ray]'")
    from graphflow.ray_backend import RayBackend

    return RayBackend(address, actors=actors, threads=threads, engine=engine, plugins=plugins, options=options)
