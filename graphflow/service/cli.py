"""`graphflow serve`: the command-line face of graphflow.service, nothing more.

    graphflow serve [--host 127.0.0.1] [--port 8188] [--data DIR] [--graphs DIR] [--input-dir DIR ...]
        [--device auto|cuda|cpu|mps] [--dtype ...] [--workers N | --devices cuda:0,cuda:1,...] [--requeue]
        [--models-dir DIR] [--no-auth] [--cors-origin URL ...]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphflow.registry import NodeRegistry


def _repo_graphs() -> Path | None:
    """The repository's graphs/ folder when run from the repository, else None (then --graphs is required)."""
    candidate = Path.cwd() / "graphs"
    return candidate if (Path.cwd() / "pyproject.toml").is_file() and candidate.is_dir() else None


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def _device_list(text: str) -> tuple[str, ...]:
    """An argparse type: a comma-separated list of devices, e.g. cuda:0,cuda:1 or cpu,cpu."""
    devices = tuple(part.strip() for part in text.split(","))
    bad = [device for device in devices if not _DEVICE.fullmatch(device)]
    if bad or not devices:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of devices (auto, cpu, mps, cuda "
                                         "or cuda:N), e.g. cuda:0,cuda:1")
    return devices


def _worker_devices(args: argparse.Namespace) -> tuple[str, ...] | str:
    """One device per worker from --devices, or --workers times --device; a message when the flags disagree."""
    if args.devices is None:
        return (args.device or "auto",) * (args.workers or 1)
    if args.workers is not None and args.workers != len(args.devices):
        return (f"--workers {args.workers} and --devices {','.join(args.devices)} ({len(args.devices)} workers) "
                "disagree: give one of them")
    if args.device is not None and any(device != args.device for device in args.devices):
        return f"--device {args.device} and --devices {','.join(args.devices)} disagree: give one of them"
    return args.devices


def add_serve(commands: Any) -> None:
    """Add the `serve` subcommand to the `graphflow` command's subparsers."""
    from graphflow import cli_options as cli

    serve = commands.add_parser("serve", help="run jobs from an HTTP API: a durable queue, live progress, results")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    serve.add_argument("--port", type=int, default=8188, help="port (default: 8188)")
    serve.add_argument("--data", type=cli._output_directory, default=Path("graphflow-data"), metavar="DIR",
                       help="queue database, results, uploads and the token (default: ./graphflow-data)")
    graphs = _repo_graphs()
    serve.add_argument("--graphs", type=cli._input_directory, default=graphs, required=graphs is None, metavar="DIR",
                       help="folder of the templates the service offers (default: the repository's graphs/)")
    serve.add_argument("--input-dir", action="append", type=cli._input_directory, default=[], metavar="DIR",
                       help="directory input files may come from, besides DATA/uploads and --graphs (repeatable)")
    serve.add_argument("--device", choices=("auto", "cuda", "cpu", "mps"), default=None,
                       help="the device of every worker (default: auto)")
    serve.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                       help="the models' precision; a job may ask for another (default: auto, fp16 on a GPU)")
    serve.add_argument("--workers", type=cli._positive("workers"), default=None,
                       help="workers on --device, each with its own engine and warm models (default: 1)")
    serve.add_argument("--devices", type=_device_list, default=None, metavar="LIST",
                       help="one worker per listed device, each with its own engine and warm models, e.g. "
                            "cuda:0,cuda:1 (or cpu,cpu for two CPU workers); instead of --workers and --device")
    serve.add_argument("--backend", choices=("local", "ray"), default="local",
                       help="local: worker threads here (default); ray: the workers are Ray actors, one per GPU of the "
                            "cluster (--workers N to choose; the graphflow[ray] extra), as `graphflow sweep` uses")
    serve.add_argument("--address", default=None, metavar="HOST:PORT",
                       help="with --backend ray: a running Ray cluster (default: start one on this machine)")
    serve.add_argument("--requeue", action="store_true",
                       help="at start, put jobs a crash left running back in the queue (default: mark them failed)")
    serve.add_argument("--models-dir", type=cli._input_directory, default=None, metavar="DIR",
                       help="a models folder in ComfyUI's layout (checkpoints/, controlnet/, loras/, vae/) that "
                            "ComfyUI prompts posted to /prompt name their model files in")
    serve.add_argument("--no-auth", action="store_true", help="no bearer token (refused unless --host is loopback)")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="allow browser requests from this origin, e.g. http://localhost:3000 (repeatable)")
    serve.add_argument("--memory-cache-mb", type=cli._megabytes, default=2048, metavar="MB",
                       help="bound on results each worker keeps in memory (default: 2048)")
    serve.add_argument("--max-image-pixels", type=cli._positive("pixels"), default=None, metavar="N",
                       help="refuse input images of more than N pixels, uploads too (default: 8192 x 8192)")
    serve.add_argument("--offload", choices=("none", "model", "sequential"), default="none",
                       help="for small GPUs, as in `graphflow run`")
    serve.add_argument("--model-memory-mb", type=cli._megabytes, default=None, metavar="MB",
                       help="bound on model weights each worker keeps on the device")
    cli._add_compile_options(serve)
    cli._add_memory_options(serve)
    serve.set_defaults(command=_serve, serve_parser=serve)


def _serve(args: argparse.Namespace, registry: NodeRegistry) -> int:
    from graphflow import cli_options as cli
    from graphflow.service.config import ServiceConfig
    from graphflow.service.server import ServeError, serve

    devices = _worker_devices(args)
    if isinstance(devices, str):
        args.serve_parser.error(devices)  # exits with status 2, after the usage line
    if args.backend == "ray" and args.devices is not None:
        args.serve_parser.error("--devices names local devices; with --backend ray each actor gets a GPU of the "
                                "cluster (give --workers N for how many)")
    if args.address is not None and args.backend != "ray":
        args.serve_parser.error("--address names a Ray cluster; it goes with --backend ray")
    if args.backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            print("error: --backend ray needs Ray, from the graphflow[ray] extra: pip install 'graphflow[ray]'",
                  file=sys.stderr)
            return 2
    options = {"device": devices[0], "dtype": args.dtype, "max_image_pixels": args.max_image_pixels,
               **cli._compile_options(args), **cli._memory_options(args)}
    config = ServiceConfig(
        data=args.data.resolve(), graphs=args.graphs.resolve(), input_dirs=tuple(d.resolve() for d in args.input_dir),
        workers=len(devices), devices=devices, options=options, cache_bytes=args.memory_cache_mb << 20,
        model_memory_bytes=args.model_memory_mb << 20 if args.model_memory_mb is not None else None,
        offload=args.offload, plugins=tuple(args.plugin), requeue=args.requeue, backend=args.backend,
        ray_address=args.address, ray_actors=args.workers if args.backend == "ray" else None,
        models_dir=args.models_dir.resolve() if args.models_dir is not None else None,
        **({"upload_pixels": args.max_image_pixels} if args.max_image_pixels else {}))
    try:
        serve(config, host=args.host, port=args.port, no_auth=args.no_auth, cors_origins=tuple(args.cors_origin))
    except ServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
