"""`graphflow sweep`: the command line of graphflow.sweeps and graphflow.sweep_runner.

    graphflow sweep T.json --grid seed=0..7 [--grid style=a,b] [--zip seed,prompt] [--repeat N] [--set NAME=VALUE]
                           [--out DIR] [--backend local|ray] [--address HOST:PORT]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphflow.events import Event
    from graphflow.registry import NodeRegistry
    from graphflow.sweep_runner import Job, JobRecord


def add_sweep(commands: Any) -> None:
    """Add the `sweep` subcommand to the `graphflow` subparsers `commands`."""
    sweep = commands.add_parser("sweep", help="run a template over a grid of param values")
    sweep.add_argument("graph", type=Path, help="the template to run (a graph document with params)")
    sweep.add_argument("--grid", action="append", default=[], metavar="NAME=VALUES",
                       help="values of one param: 1,2,3, a JSON list, or for INT params ranges 0..7 and 0..20..5 "
                            "(inclusive; repeatable: the grids multiply, the first varying slowest)")
    sweep.add_argument("--zip", action="append", default=[], metavar="NAME,NAME",
                       help="--grid params whose values go together, i-th with i-th (equally long; repeatable)")
    sweep.add_argument("--repeat", type=int, default=1, metavar="N", help="run the whole grid N times")
    sweep.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="assignments",
                       help="a value every job uses (repeatable)")
    sweep.add_argument("--out", type=Path, default=Path("sweep"),
                       help="where each job's folder, sweep.json and contact_sheet.png go (default: ./sweep)")
    sweep.add_argument("--input-dir", action="append", type=Path, default=None, metavar="DIR",
                       help="another directory input files may come from (repeatable); as with run, a relative "
                            "path is looked up in the document's folder, then each --input-dir, then the current "
                            "directory")
    sweep.add_argument("--backend", choices=("local", "ray"), default="local",
                       help="local: one Engine here, shared nodes run once (default); ray: the graphflow[ray] extra")
    sweep.add_argument("--address", default=None, metavar="HOST:PORT",
                       help="with --backend ray: a running cluster (as `ray start --head` prints; default: start one "
                            "on this machine for the sweep)")
    sweep.add_argument("--actors", type=int, default=None, metavar="N",
                       help="with --backend ray: how many engines (default: one per GPU; CPU-only: CPUs // threads)")
    sweep.add_argument("--threads-per-actor", type=int, default=None, metavar="N", dest="threads",
                       help="with --backend ray on CPUs: torch threads (and Ray CPUs) per actor (default: 1)")
    sweep.add_argument("--device", choices=("auto", "cuda", "cpu", "mps"), default="auto",
                       help="where models run (default: auto, a GPU when there is one)")
    sweep.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                       help="the models' precision (default: auto, fp16 on a GPU and fp32 on the CPU)")
    sweep.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                       help="keep expensive results here across runs (default: none)")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.set_defaults(command=run_sweep_command)


class SweepProgress:
    """One tqdm bar over the jobs, the running job, node and sampler step beside it; without a terminal (a log), a
    line per finished job instead."""

    def __init__(self, total: int, enabled: bool) -> None:
        from graphflow.progress import is_terminal

        self.total = total
        self.enabled = enabled
        self.terminal = is_terminal(sys.stderr)
        self._bar: Any = None  # made at the first event: a sweep refused up front shows no bar
        self._done = 0

    def event(self, job: Job, event: Event) -> None:
        from graphflow.events import NodeProgress, NodeStarted

        if not self.terminal:
            return
        if isinstance(event, NodeStarted):
            self._shown().set_postfix_str(f"{job.folder}: {event.node}")
        elif isinstance(event, NodeProgress):
            self._shown().set_postfix_str(f"{job.folder}: {event.node} step {event.step}/{event.total}")

    def job(self, record: JobRecord) -> None:
        if self.terminal:
            self._shown().update(1)
        elif self.enabled:
            self._done += 1
            print(f"[{self._done}/{self.total}] {record.job.folder}: ran {len(record.ran)} nodes, "
                  f"{len(record.cached)} from cache, {record.seconds:.2f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _shown(self) -> Any:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, unit="job", file=sys.stderr, leave=False, disable=not self.enabled)
        return self._bar


def run_sweep_command(args: argparse.Namespace, registry: NodeRegistry) -> int:
    """Exit codes as `run` (graphflow.cli.EXIT_CODES): 0 ok, 1 invalid, 2 a backend that cannot run here (a usage
    error), 3 a job failed, 130 interrupted."""
    from graphflow.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK, EXIT_USAGE, show_traceback
    from graphflow.document import load_document
    from graphflow.engine import Engine
    from graphflow.errors import GraphflowError, NodeExecutionError, ValidationError, printable
    from graphflow.paths import command_line_roots
    from graphflow.sweep_runner import SUMMARY, BackendUnavailable, JobFailed, make_backend, run_sweep, summary_table
    from graphflow.sweeps import sweep_batch

    progress: SweepProgress | None = None
    finished: list[JobRecord] = []
    backend = None
    try:
        engine = Engine(registry, input_dirs=command_line_roots(args.input_dir), output_dir=args.out,
                        disk_cache=args.cache_dir, options={"device": args.device, "dtype": args.dtype})
        backend = make_backend(args.backend, address=args.address, engine=engine, plugins=args.plugin,
                               actors=args.actors, threads=args.threads)
        batch = sweep_batch(load_document(args.graph), grid=args.grid, zips=args.zip, fixed=args.assignments,
                            repeat=args.repeat)
        progress = bar = SweepProgress(batch.size(), not args.quiet)

        def on_job(record: JobRecord) -> None:
            finished.append(record)
            bar.job(record)

        result = run_sweep(args.graph, batch, args.out, engine=engine, backend=backend, on_job=on_job,
                           on_event=progress.event)
    except BackendUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as error:
        _close(progress, backend)
        print(f"{printable(str(args.graph))}: {error}", file=sys.stderr)
        return EXIT_INVALID
    except (GraphflowError, OSError, KeyboardInterrupt) as error:
        _close(progress, backend)
        listed = f"{len(finished)} finished job{'s' if len(finished) != 1 else ''} and their files stay, " \
                 f"listed in {args.out / SUMMARY}"
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else f"error: {error}"
        print(f"{what}; {listed}", file=sys.stderr)
        show_traceback(args, error.cause if isinstance(error, NodeExecutionError) else None)
        return EXIT_INTERRUPTED if isinstance(error, KeyboardInterrupt) else \
            EXIT_FAILED if isinstance(error, (NodeExecutionError, JobFailed)) else EXIT_INVALID
    _close(progress, backend)
    print(summary_table(result))
    print(f"wrote {args.out / SUMMARY}" + (f" and {result.contact_sheet}" if result.contact_sheet else ""))
    return EXIT_OK


def _close(progress: SweepProgress | None, backend: Any) -> None:
    """Close the bar; stop a backend's actors (and the Ray cluster it started for this sweep)."""
    if progress is not None:
        progress.close()
    close = getattr(backend, "close", None)
    if close is not None:
        close()
