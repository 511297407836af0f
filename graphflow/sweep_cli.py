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
    sweep.add_argument("graph", type=Path)
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
    sweep.add_argument("--address", default=None, metavar="HOST:PORT", help="with --backend ray: a running cluster")
    sweep.add_argument("--device", choices=("auto", "cuda", "cpu", "mps"), default="auto")
    sweep.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto")
    sweep.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                       help="keep expensive results here across runs (default: none)")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.set_defaults(command=run_sweep_command)


class SweepProgress:
    """One tqdm bar over the jobs; the running job, node and sampler step beside it."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self._bar: Any = None  # made at the first event: a sweep refused up front shows no bar

    def event(self, job: Job, event: Event) -> None:
        from graphflow.events import NodeProgress, NodeStarted

        if isinstance(event, NodeStarted):
            self._shown().set_postfix_str(f"{job.folder}: {event.node}")
        elif isinstance(event, NodeProgress):
            self._shown().set_postfix_str(f"{job.folder}: {event.node} step {event.step}/{event.total}")

    def job(self, record: JobRecord) -> None:
        self._shown().update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _shown(self) -> Any:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, unit="job", file=sys.stderr, leave=False, disable=not self.enabled)
        return self._bar


def run_sweep_command(args: argparse.Namespace, registry: NodeRegistry) -> int:
    """Exit codes as `run`: 0 ok, 1 invalid, 2 a backend that cannot run here, 3 a job failed, 130 interrupted."""
    from graphflow.cli import show_traceback
    from graphflow.document import load_document
    from graphflow.engine import Engine
    from graphflow.errors import GraphflowError, NodeExecutionError, ValidationError, printable
    from graphflow.paths import command_line_roots
    from graphflow.sweep_runner import SUMMARY, BackendUnavailable, make_backend, run_sweep, summary_table
    from graphflow.sweeps import sweep_batch

    progress: SweepProgress | None = None
    finished: list[JobRecord] = []
    try:
        engine = Engine(registry, input_dirs=command_line_roots(args.input_dir), output_dir=args.out,
                        disk_cache=args.cache_dir, options={"device": args.device, "dtype": args.dtype})
        backend = make_backend(args.backend, address=args.address, engine=engine)
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
        return 2
    except ValidationError as error:
        _close(progress)
        print(f"{printable(str(args.graph))}: {error}", file=sys.stderr)
        return 1
    except (GraphflowError, OSError, KeyboardInterrupt) as error:
        _close(progress)
        listed = f"{len(finished)} finished job{'s' if len(finished) != 1 else ''} and their files stay, " \
                 f"listed in {args.out / SUMMARY}"
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else f"error: {error}"
        print(f"{what}; {listed}", file=sys.stderr)
        show_traceback(args, error.cause if isinstance(error, NodeExecutionError) else None)
        return 130 if isinstance(error, KeyboardInterrupt) else 3 if isinstance(error, NodeExecutionError) else 1
    _close(progress)
    print(summary_table(result))
    print(f"wrote {args.out / SUMMARY}" + (f" and {result.contact_sheet}" if result.contact_sheet else ""))
    return 0


def _close(progress: SweepProgress | None) -> None:
    if progress is not None:
        progress.close()
