"""The `graphflow` command: a thin layer over the Python API.

    graphflow run GRAPH.json [--set NAME=VALUE ...] [--out DIR] [--input-dir DIR ...]
    graphflow validate GRAPH.json [--set NAME=VALUE ...] [--json]
    graphflow nodes [--json]
    graphflow schema
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphflow.document import load_document
from graphflow.errors import GraphError, GraphflowError, NodeExecutionError, ValidationError
from graphflow.node import REQUIRED, Input, Node
from graphflow.registry import NodeRegistry, RegistryError, default_registry
from graphflow.templates import parse_assignments, parse_params

if TYPE_CHECKING:
    from graphflow.engine import RunResult


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        registry = default_registry(args.plugin)
    except RegistryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        return args.command(args, registry)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphflow", description="Run image-generation workflows as node graphs.")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import node types from this module too (repeatable)")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a graph document or template")
    run.add_argument("graph", type=Path)
    _add_set(run)
    run.add_argument("--out", type=Path, default=Path("output"), help="output directory (default: ./output)")
    run.add_argument("--input-dir", action="append", type=Path, default=None, metavar="DIR",
                     help="directory input files may come from; relative paths resolve against the first "
                          "(default: the current directory; repeatable)")
    run.add_argument("--output", action="append", default=None, metavar="NAME",
                     help="compute only this named output (repeatable; default: all outputs and output nodes)")
    run.add_argument("--memory-cache-mb", type=_megabytes, default=2048, metavar="MB",
                     help="bound on results kept in memory during the run (default: 2048)")
    run.add_argument("--cache-dir", type=Path, default=os.environ.get("GRAPHFLOW_CACHE_DIR"), metavar="DIR",
                     help="keep expensive results (edge maps, encodings, latents) here across runs "
                          "(default: $GRAPHFLOW_CACHE_DIR; none when unset)")
    run.add_argument("--device", choices=("auto", "cuda", "cpu", "mps"), default="auto")
    run.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto")
    run.add_argument("--offload", choices=("none", "model", "sequential"), default="none",
                     help="for small GPUs: 'model' keeps each model on the GPU only while a node uses it, "
                          "'sequential' streams weights layer by layer (slowest, least memory)")
    run.add_argument("--model-memory-mb", type=_megabytes, default=None, metavar="MB",
                     help="bound on model weights kept on the device; least recently used models leave first "
                          "(default: keep 1 GiB of GPU memory free)")
    run.add_argument("--compile", action="store_true", help="torch.compile UNets and ControlNets (slow first step)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(command=_run)

    tiny = commands.add_parser("make-tiny-models", help="write tiny random-weight SD1.5/SDXL/ControlNet models")
    tiny.add_argument("dir", type=Path, nargs="?", default=None,
                      help="where to write them (default: where `tiny:NAME` sources look, "
                           "$GRAPHFLOW_TINY_MODELS or ~/.cache/graphflow/tiny-models)")
    tiny.set_defaults(command=_make_tiny_models)

    validate = commands.add_parser("validate", help="check a document and list every problem")
    validate.add_argument("graph", type=Path)
    _add_set(validate)
    validate.add_argument("--json", action="store_true", help="print problems as JSON")
    validate.set_defaults(command=_validate)

    nodes = commands.add_parser("nodes", help="list the node types with their inputs and outputs")
    nodes.add_argument("--json", action="store_true")
    nodes.set_defaults(command=_nodes)

    schema = commands.add_parser("schema", help="print the JSON Schema of graph documents")
    schema.set_defaults(command=_schema)
    return parser


def _megabytes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of megabytes, found {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of megabytes, found {value}")
    return value


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="assignments",
                        help="give a template param a value (repeatable)")


def _validate(args: argparse.Namespace, registry: NodeRegistry) -> int:
    from graphflow.validation import compile_document

    unbound: list[str] = []
    try:
        document = load_document(args.graph)
        values = parse_assignments(document, args.assignments)
        compile_document(document, registry, values, base_dir=args.graph.resolve().parent, as_template=True)
        errors: list[GraphError] = []
        unbound = [f"{name} ({spec.type})" for name, spec in parse_params(document)[0].items()
                   if spec.required and name not in values]
    except ValidationError as error:
        errors = error.errors
    if args.json:
        print(json.dumps({"valid": not errors, "errors": [error.to_json() for error in errors],
                          "params_without_value": unbound}, indent=2))
    elif errors:
        print(f"{args.graph}: {len(errors)} problem{'s' if len(errors) != 1 else ''}")
        for error in errors:
            print(f"  {error}")
    else:
        needs = f"; a run needs values for {', '.join(unbound)}" if unbound else ""
        print(f"{args.graph}: valid{needs}")
    return 1 if errors else 0


def _run(args: argparse.Namespace, registry: NodeRegistry) -> int:
    from graphflow.engine import Engine
    from graphflow.models import ModelManager
    from graphflow.progress import ProgressDisplay

    models = ModelManager(args.model_memory_mb << 20 if args.model_memory_mb is not None else None,
                          offload=args.offload, compile=args.compile)
    engine = Engine(registry, input_dirs=args.input_dir, output_dir=args.out, disk_cache=args.cache_dir,
                    cache_bytes=args.memory_cache_mb << 20, options={"device": args.device, "dtype": args.dtype},
                    models=models)
    display = ProgressDisplay(enabled=not args.quiet)
    try:
        params = parse_assignments(load_document(args.graph), args.assignments)
        result = engine.run(args.graph, params, outputs=args.output, on_event=display)
    except ValidationError as error:
        display.close()
        print(f"{args.graph}: {error}", file=sys.stderr)
        return 1
    except NodeExecutionError as error:
        display.close()
        print(f"error: {error}", file=sys.stderr)
        return 1
    except GraphflowError as error:
        display.close()
        print(f"stopped: {error}; finished nodes stay cached", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        display.close()
        print("interrupted: no partial file was written", file=sys.stderr)
        return 130
    display.close()
    print(_summary(result))
    return 0


def _make_tiny_models(args: argparse.Namespace, registry: NodeRegistry) -> int:
    from graphflow.models.tiny import TINY_NAMES, default_tiny_models_dir, make_tiny_models

    folder = make_tiny_models(args.dir if args.dir is not None else default_tiny_models_dir())
    print(f"tiny models in {folder}: {', '.join(TINY_NAMES)}")
    return 0


def _summary(result: RunResult) -> str:
    lines = [f"ran {len(result.ran)} node{'s' if len(result.ran) != 1 else ''}, "
             f"{len(result.cached)} from cache, in {result.seconds:.2f} s"]
    for name, value in result.outputs.items():
        lines.append(f"  {name} = {_describe(value)}")
    lines.extend(f"  wrote {path}" for path in result.files)
    return "\n".join(lines)


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__} {list(shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _nodes(args: argparse.Namespace, registry: NodeRegistry) -> int:
    if args.json:
        print(json.dumps([_node_json(node) for node in registry], indent=2))
        return 0
    for node in registry:
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
