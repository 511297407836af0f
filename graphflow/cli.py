"""The `graphflow` command: a thin layer over the Python API.

    graphflow run GRAPH.json [--set NAME=VALUE ...] [--out DIR] [--input-dir DIR ...]
    graphflow validate GRAPH.json [--set NAME=VALUE ...] [--json]
    graphflow nodes [--json]
    graphflow schema
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:  # the first moment Ctrl-C can be answered: before these imports, nothing of graphflow runs (its package is lazy)
    from graphflow.document import load_document
    from graphflow.errors import GraphError, GraphflowError, NodeExecutionError, ValidationError, printable
    from graphflow.node import REQUIRED, Input, Node
    from graphflow.registry import NodeRegistry, RegistryError, default_registry
    from graphflow.templates import parse_assignments, parse_params
except KeyboardInterrupt:
    print("interrupted: nothing was written", file=sys.stderr)
    raise SystemExit(130) from None

from graphflow.cli_options import (  # the options several commands share (serve, sweep, train use them too)
    _add_compile_options,
    _add_input_dir,
    _add_memory_options,
    _add_set,
    _compile_options,
    _megabytes,
    _memory_options,
    _output_directory,
    _positive,
)

if TYPE_CHECKING:
    from graphflow.engine import RunResult
    from graphflow.events import Event, EventHandler

# exit codes, the same for every command (scripts tell a bad document from a failed run by them)
EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = """exit codes:
  0    done (validate: the document is valid)
  1    an invalid document or template, or a plugin that cannot be loaded (every problem is listed)
  2    a usage error: an unknown option or command, a bad option value
  3    the run failed: a node raised (--debug shows its traceback); finished nodes stay cached
  130  interrupted (Ctrl-C): files already finished stay, nothing partial remains"""


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        # a name from a document that this terminal's encoding cannot show is escaped, never a UnicodeEncodeError
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    parser = command_parser()
    args = parser.parse_args(argv)
    args.plugin, args.debug = [*args.plugin, *args.command_plugin], args.debug or args.command_debug
    try:
        registry = default_registry(args.plugin)
        status = args.command(args, registry)
        sys.stdout.flush()  # here, where a failure to write can still be reported
        return status
    except RegistryError as error:
        print(f"error: {error}", file=sys.stderr)
        show_traceback(args, error.__cause__)
        return EXIT_INVALID
    except KeyboardInterrupt:  # before a run started (importing plugins, say): nothing was written
        print("interrupted: nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except OSError as error:  # a terminal or file that cannot take the output: a full disk, an I/O error
        _silence_stdout()
        print(f"error: cannot write the output: {error}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Send what stdout still holds nowhere, so that flushing it at exit fails no more."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def command_parser() -> argparse.ArgumentParser:
    """The `graphflow` parser: every command, each taking the global options after its name too."""
    parser = _parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _add_global_options(command, dest_prefix="command_")
    return parser


def _add_global_options(parser: argparse.ArgumentParser, dest_prefix: str = "") -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE", dest=f"{dest_prefix}plugin",
                        help="import node types from this module too: its NODES lists them; an installed module, "
                             "else one in the current directory (repeatable)")
    parser.add_argument("--debug", action="store_true", dest=f"{dest_prefix}debug",
                        help="on a failure, also print the traceback of what raised (a failing node's own code)")


def show_traceback(args: argparse.Namespace, error: BaseException | None) -> None:
    """With --debug, the traceback of `error` (a node's own exception, a plugin's import error) on stderr."""
    if getattr(args, "debug", False) and error is not None:
        import traceback

        traceback.print_exception(error, file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    from graphflow import __version__

    parser = argparse.ArgumentParser(prog="graphflow", description="Run image-generation workflows as node graphs.",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"graphflow {__version__}",
                        help="print graphflow's version and exit")
    _add_global_options(parser)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a graph document or template")
    run.add_argument("graph", type=Path, help="a graph document or template, or a PNG that SaveImage wrote "
                     "(runs its embedded workflow again; --set overrides its params)")
    _add_set(run)
    run.add_argument("--out", type=_output_directory, default=Path("output"),
                     help="output directory (default: ./output)")
    _add_input_dir(run)
    run.add_argument("--output", action="append", default=None, metavar="NAME",
                     help="compute only this named output (repeatable; default: all outputs and output nodes)")
    run.add_argument("--memory-cache-mb", type=_megabytes, default=2048, metavar="MB",
                     help="bound on results kept in memory during the run (default: 2048)")
    run.add_argument("--cache-dir", type=_output_directory, default=os.environ.get("GRAPHFLOW_CACHE_DIR"),
                     metavar="DIR",
                     help="keep expensive results (edge maps, encodings, latents) here across runs "
                          "(default: $GRAPHFLOW_CACHE_DIR; none when unset)")
    run.add_argument("--max-image-pixels", type=_positive("pixels"), default=None, metavar="N",
                     help="refuse input images of more than N pixels before decoding them "
                          "(default: 67108864, i.e. 8192 x 8192)")
    run.add_argument("--device", choices=("auto", "cuda", "cpu", "mps"), default="auto",
                     help="where models run (default: auto, a GPU when there is one)")
    run.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                     help="the models' precision (default: auto, fp16 on a GPU and fp32 on the CPU)")
    run.add_argument("--offload", choices=("none", "model", "sequential"), default="none",
                     help="for small GPUs: 'model' keeps each model on the GPU only while a node uses it, "
                          "'sequential' streams weights layer by layer (slowest, least memory)")
    run.add_argument("--model-memory-mb", type=_megabytes, default=None, metavar="MB",
                     help="bound on model weights kept on the device; least recently used models leave first "
                          "(default: keep 1 GiB of GPU memory free)")
    _add_compile_options(run)
    _add_memory_options(run)
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(command=_run)

    tiny = commands.add_parser("make-tiny-models", help="write tiny random-weight SD1.5/SDXL/ControlNet models")
    tiny.add_argument("dir", type=Path, nargs="?", default=None,
                      help="where to write them (default: where `tiny:NAME` sources look, "
                           "$GRAPHFLOW_TINY_MODELS or ~/.cache/graphflow/tiny-models)")
    tiny.set_defaults(command=_make_tiny_models)

    validate = commands.add_parser("validate", help="check a document and list every problem")
    validate.add_argument("graph", type=Path, help="the graph document or template to check")
    _add_set(validate)
    _add_input_dir(validate)
    validate.add_argument("--json", action="store_true", help="print problems as JSON")
    validate.set_defaults(command=_validate)

    nodes = commands.add_parser("nodes", help="list the node types with their inputs and outputs")
    nodes.add_argument("names", nargs="*", metavar="NAME", help="show only these node types (default: all)")
    nodes.add_argument("--json", action="store_true", help="print the node types as JSON")
    nodes.set_defaults(command=_nodes)

    schema = commands.add_parser("schema", help="print the JSON Schema of graph documents")
    schema.set_defaults(command=_schema)

    from graphflow.training.cli import add_train_controlnet

    add_train_controlnet(commands)
    from graphflow.sweep_cli import add_sweep

    add_sweep(commands)
    from graphflow.service.cli import add_serve

    add_serve(commands)
    from graphflow.show_cli import add_show

    add_show(commands)
    from graphflow.comfy.cli import add_import_comfy

    add_import_comfy(commands)
    return parser


def _validate(args: argparse.Namespace, registry: NodeRegistry) -> int:
    from graphflow.paths import PathPolicy, command_line_roots
    from graphflow.planning import path_errors
    from graphflow.validation import compile_document

    unbound: list[str] = []
    try:
        paths = PathPolicy.create(command_line_roots(args.input_dir))
        document = load_document(args.graph)
        values = parse_assignments(document, args.assignments)
        compiled = compile_document(document, registry, values, base_dir=args.graph.resolve().parent,
                                    roots=paths.input_roots, as_template=True, in_folder=True)
        errors: list[GraphError] = path_errors(compiled, paths)
        unbound = [f"{name} ({'a list of ' if spec.list else ''}{spec.type})"
                   for name, spec in parse_params(document)[0].items() if spec.required and name not in values]
    except ValidationError as error:
        errors = error.errors
    if args.json:
        print(json.dumps({"valid": not errors, "errors": [error.to_json() for error in errors],
                          "params_without_value": unbound}, indent=2))
    elif errors:
        print(f"{printable(str(args.graph))}: {len(errors)} problem{'s' if len(errors) != 1 else ''}")
        for error in errors:
            print(f"  {error}")
    else:
        needs = f"; a run needs values for {', '.join(unbound)}" if unbound else ""
        print(f"{printable(str(args.graph))}: valid{needs}")
    return 1 if errors else 0


def _run(args: argparse.Namespace, registry: NodeRegistry) -> int:
    from graphflow.events import FileWritten
    from graphflow.progress import ProgressDisplay
    from graphflow.rerun import warnings_as_lines

    display = ProgressDisplay(enabled=not args.quiet)
    finished: list[Path] = []  # files that output nodes reported whole (FileWritten), for the interrupt message

    def on_event(event: Event) -> None:
        if isinstance(event, FileWritten):
            finished.append(event.path)
        display(event)

    try:
        with warnings_as_lines(sys.stderr):  # what differs from when a PNG was made
            result = _execute(args, registry, on_event)
    except (GraphflowError, OSError, KeyboardInterrupt) as error:
        display.close()
        print(_stopped(args, error, finished), file=sys.stderr)
        show_traceback(args, error.cause if isinstance(error, NodeExecutionError) else None)
        return EXIT_INTERRUPTED if isinstance(error, KeyboardInterrupt) else \
            EXIT_FAILED if isinstance(error, NodeExecutionError) else EXIT_INVALID
    display.close()
    print(_summary(result))
    return 0


def _execute(args: argparse.Namespace, registry: NodeRegistry, on_event: EventHandler) -> RunResult:
    from graphflow.engine import Engine
    from graphflow.models import ModelManager
    from graphflow.paths import command_line_roots
    from graphflow.rerun import run_document

    models = ModelManager(args.model_memory_mb << 20 if args.model_memory_mb is not None else None,
                          offload=args.offload)
    options = {"device": args.device, "dtype": args.dtype, "max_image_pixels": args.max_image_pixels,
               **_compile_options(args), **_memory_options(args)}
    engine = Engine(registry, input_dirs=command_line_roots(args.input_dir), output_dir=args.out,
                    disk_cache=args.cache_dir,
                    cache_bytes=args.memory_cache_mb << 20, options=options, models=models)
    params = parse_assignments(run_document(args.graph), args.assignments)
    return engine.run(args.graph, params, outputs=args.output, on_event=on_event)


def _stopped(args: argparse.Namespace, error: BaseException, finished: list[Path]) -> str:
    """What to tell the user about a run that stopped with `error`, after output nodes wrote `finished`."""
    if isinstance(error, KeyboardInterrupt):
        if not finished:
            return "interrupted: no file was written, and nothing partial remains"
        # output nodes report a file only once it is whole and stays, and remove their partial ones
        return "\n".join(["interrupted; these files were finished before it and stay:",
                          *(f"  wrote {printable(str(path))}" for path in finished), "no partial file remains"])
    if isinstance(error, ValidationError):
        return f"{printable(str(args.graph))}: {error}"
    if isinstance(error, (NodeExecutionError, OSError)):
        return f"error: {_lines(str(error))}"
    return f"stopped: {_lines(str(error))}; finished nodes stay cached"


def _lines(text: str) -> str:
    """Text from a document or a library, safe for a terminal: each line escaped, none shortened, none added."""
    return "\n".join(printable(line, limit=None) for line in text.split("\n"))


def _make_tiny_models(args: argparse.Namespace, registry: NodeRegistry) -> int:
    from graphflow.models.tiny import TINY_NAMES, default_tiny_models_dir, make_tiny_models

    folder = make_tiny_models(args.dir if args.dir is not None else default_tiny_models_dir())
    print(f"tiny models in {folder}: {', '.join(TINY_NAMES)}")
    return 0


def _summary(result: RunResult) -> str:
    lines = [f"ran {len(result.ran)} node{'s' if len(result.ran) != 1 else ''}, "
             f"{len(result.cached)} from cache, in {result.seconds:.2f} s"]
    for name, value in result.outputs.items():
        lines.append(f"  {printable(name)} = {printable(_describe(value))}")
    lines.extend(f"  wrote {printable(str(path))}" for path in result.files)
    return "\n".join(lines)


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__} {list(shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _nodes(args: argparse.Namespace, registry: NodeRegistry) -> int:
    from graphflow.errors import did_you_mean

    unknown = [name for name in args.names if name not in registry]
    if unknown:
        for name in unknown:
            print(f"error: no node type named {printable(name)!r}{did_you_mean(name, registry.names())}",
                  file=sys.stderr)
        return EXIT_USAGE
    shown = [node for name in dict.fromkeys(args.names) if (node := registry.get(name)) is not None] \
        if args.names else list(registry)
    if args.json:
        print(json.dumps([_node_json(node) for node in shown], indent=2))
        return 0
    for node in shown:
        print(f"{node.type_name} ({node.category}, v{node.version}): {_first_line(node.__doc__)}")
        for spec in node.inputs:
            details = [spec.type + ("[]" if spec.list else "")]
            if spec.choices is not None:
                details.append("one of " + "|".join(map(str, spec.choices)))
            if spec.min is not None or spec.max is not None:
                details.append(spec.range_text().removeprefix("a value in "))
            if not spec.required:
                details.append("optional" if spec.optional else f"default {spec.default!r}")
            print(f"    in  {spec.name}: {', '.join(details)}. {spec.description}")
        for output in node.outputs:
            print(f"    out {output.name}: {output.type}. {output.description}")
    return 0


def _node_json(node: type[Node]) -> dict[str, Any]:
    return {
        "type": node.type_name, "category": node.category, "version": node.version,
        "description": _first_line(node.__doc__), "output_node": node.is_output,
        "inputs": [_input_json(spec) for spec in node.inputs],
        "outputs": [{"name": spec.name, "type": spec.type, "description": spec.description} for spec in node.outputs],
    }


def _input_json(spec: Input) -> dict[str, Any]:
    described = {"name": spec.name, "type": spec.type, "description": spec.description, "required": spec.required,
                 "optional": spec.optional, "list": spec.list, "file": spec.file, "model": spec.model}
    extras = {"default": spec.default, "min": spec.min, "max": spec.max,
              "choices": list(spec.choices) if spec.choices is not None else None}
    return described | {key: value for key, value in extras.items() if value is not None and value is not REQUIRED}


def _schema(args: argparse.Namespace, registry: NodeRegistry) -> int:
    from graphflow.schema import document_schema

    print(json.dumps(document_schema(registry), indent=2))
    return 0


def _first_line(text: str | None) -> str:
    return (text or "").strip().split("\n")[0]


if __name__ == "__main__":
    sys.exit(main())
