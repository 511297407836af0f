"""`graphflow show G.json -o g.svg` draws a graph (SVG, Graphviz DOT, Mermaid); `graphflow params T.json` lists
a template's params. Both read a document (or a PNG that SaveImage wrote) and validate it first."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from graphflow.errors import ValidationError, printable
from graphflow.registry import NodeRegistry


def add_show(commands: Any) -> None:
    """Add the `show` and `params` subcommands to the `graphflow` subparsers `commands`."""
    from graphflow.drawing import FORMATS

    show = commands.add_parser("show", help="draw a graph: its nodes with their types, named links and params")
    show.add_argument("graph", type=Path, help="a graph document or template, or a PNG that SaveImage wrote")
    show.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                      help=f"write the drawing here, in the format its suffix names ({', '.join(FORMATS)}); "
                           "default: print it")
    show.add_argument("--format", choices=sorted(set(FORMATS.values())), default=None,
                      help="svg, dot (Graphviz) or mmd (a Mermaid flowchart); default: from the -o suffix, else dot")
    show.set_defaults(command=_show)

    params = commands.add_parser("params", help="list a template's params: type, default, range, choices")
    params.add_argument("graph", type=Path, help="a template (any graph document), or a PNG that SaveImage wrote")
    params.add_argument("--json", action="store_true", help="print them as JSON (as `graphflow nodes --json` inputs)")
    params.set_defaults(command=_params)


def _show(args: argparse.Namespace, registry: NodeRegistry) -> int:
    from graphflow.drawing import FORMATS, document_view, render

    format = args.format or (FORMATS.get(args.output.suffix.lower()) if args.output is not None else "dot")
    if format is None:
        print(f"error: cannot tell the format from {printable(str(args.output))}: name the file "
              f"{' or '.join(f'*{suffix}' for suffix in FORMATS)}, or give --format", file=sys.stderr)
        return 2
    try:
        document = _checked(args.graph, registry)
    except ValidationError as error:
        print(f"{printable(str(args.graph))}: {error}", file=sys.stderr)
        return 1
    types = {node_id: entry["type"] if "type" in entry else f"template {entry['template']}"
             for node_id, entry in document["nodes"].items()}
    drawing = render(document_view(document, types), format)
    if args.output is None:
        sys.stdout.write(drawing)
        return 0
    from graphflow.atomic import atomic_write

    atomic_write(args.output, drawing.encode("utf-8"))
    print(f"wrote {printable(str(args.output))} ({format})")
    return 0


def _checked(path: Path, registry: NodeRegistry) -> dict[str, Any]:
    """The document at `path` (or in a PNG), validated as a template: params may stay without values."""
    from graphflow.paths import command_line_roots
    from graphflow.rerun import run_document
    from graphflow.validation import compile_document

    document = run_document(path)
    compile_document(document, registry, {}, base_dir=path.resolve().parent, roots=tuple(command_line_roots(None)),
                     as_template=True)
    return document


def _params(args: argparse.Namespace, registry: NodeRegistry) -> int:
    from graphflow.cli import _input_json
    from graphflow.rerun import run_document
    from graphflow.templates import parse_params

    try:
        specs, errors = parse_params(run_document(args.graph))
        if errors:
            raise ValidationError(errors)
    except ValidationError as error:
        print(f"{printable(str(args.graph))}: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([_input_json(spec) for spec in specs.values()], indent=2, ensure_ascii=False))
        return 0
    if not specs:
        print(f"{printable(str(args.graph))} declares no params")
        return 0
    rows = [("NAME", "TYPE", "DEFAULT", "RANGE", "CHOICES", "DESCRIPTION")]
    for spec in specs.values():
        bounds = "" if spec.min is None and spec.max is None else \
            f"{'' if spec.min is None else spec.min}..{'' if spec.max is None else spec.max}"
        rows.append((spec.name, f"list of {spec.type}" if spec.list else spec.type,
                     "(required)" if spec.required else json.dumps(spec.default, ensure_ascii=False),
                     bounds, "|".join(json.dumps(choice, ensure_ascii=False) for choice in spec.choices or ()),
                     spec.description))
    shown = [[*map(_cell, row[:-1]), printable(row[-1], limit=None)] for row in rows]
    widths = [max(len(row[column]) for row in shown) for column in range(len(rows[0]))]
    for row in shown:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _cell(text: str) -> str:
    """A table cell before the description: on one line, unprintable characters escaped, at most 40 characters
    (--json has them whole)."""
    shown = printable(text, limit=None)
    return shown if len(shown) <= 40 else shown[:39] + "…"
