"""`graphflow import-comfy`: a ComfyUI workflow (API or UI JSON, or a PNG ComfyUI saved) as a graphflow document.

    graphflow import-comfy FILE -o G.json [--models-dir DIR] [--input-dir DIR] [--name NAME] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphflow.registry import NodeRegistry


def add_import_comfy(commands: Any) -> None:
    """Add the `import-comfy` subcommand to the `graphflow` subparsers `commands`."""
    command = commands.add_parser("import-comfy", help="convert a ComfyUI workflow (API/UI JSON or PNG) to a graph")
    command.add_argument("file", type=Path, help="ComfyUI API-format JSON, UI-format workflow JSON, or a ComfyUI PNG")
    command.add_argument("-o", "--output", type=Path, required=True, metavar="G.json",
                         help="where to write the graphflow document (replaced whole, never half-written)")
    command.add_argument("--models-dir", type=Path, default=None, metavar="DIR",
                         help="ComfyUI's models folder (checkpoints/, controlnet/, loras/, vae/): model names "
                              "resolve there (default: left as FOLDER/NAME, relative to the run's --input-dir)")
    command.add_argument("--input-dir", type=Path, default=None, metavar="DIR",
                         help="ComfyUI's input folder, where LoadImage names resolve (default: left relative)")
    command.add_argument("--name", default=None, help="the document's name (default: the file's)")
    command.add_argument("--json", action="store_true",
                         help="print the fidelity of each ComfyUI node and the graphflow nodes it became as JSON")
    command.set_defaults(command=run_import_comfy)


def run_import_comfy(args: argparse.Namespace, registry: NodeRegistry) -> int:
    """Exit 0 with the document written and the fidelity summary printed; 1 with every problem listed."""
    from graphflow.atomic import atomic_write
    from graphflow.comfy.importer import import_file
    from graphflow.document import dumps
    from graphflow.errors import ValidationError, printable

    try:
        imported = import_file(args.file, models_dir=args.models_dir, input_dir=args.input_dir, registry=registry)
    except ValidationError as error:
        print(f"{printable(str(args.file))}: {len(error.errors)} problem{'s' if len(error.errors) != 1 else ''}",
              file=sys.stderr)
        for problem in error.errors:
            print(f"  {problem}", file=sys.stderr)
        return 1
    if args.name:
        imported.document["name"] = args.name
    atomic_write(args.output, dumps(imported.document).encode("utf-8"))
    if args.json:
        print(json.dumps({"written": str(args.output), "fidelity": imported.fidelity_json(),
                          "outputs": imported.outputs}, indent=2))
    else:
        print(imported.summary())
        print(f"wrote {printable(str(args.output))}")
    return 0
