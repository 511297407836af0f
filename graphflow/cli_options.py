"""Command-line options and argparse types that several `graphflow` commands share (run, serve, sweep, train):
torch.compile and memory options, positive numbers, input and output directories, --input-dir and --set."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _add_compile_options(run: argparse.ArgumentParser) -> None:
    """torch.compile (graphflow.models.compilation): run options like --device."""
    from graphflow.models.compilation import COMPILE_MODES, COMPONENTS, DEFAULT_COMPONENTS

    run.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                     help="torch.compile the --compile-components with this mode (default when given: default; "
                          f"{', '.join(COMPILE_MODES)}); the first step is slow")
    run.add_argument("--compile-components", type=_components, default=None, metavar="LIST",
                     help=f"with --compile: the modules to compile, some of {','.join(COMPONENTS)} "
                          f"(default: {','.join(DEFAULT_COMPONENTS)})")


def _components(text: str) -> list[str]:
    from graphflow.models.compilation import CompileOptionError, parse_components

    try:
        return list(parse_components(text))
    except CompileOptionError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("option compile_components ")) from None


def _compile_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"compile": args.compile, "compile_components": args.compile_components}


def _add_memory_options(run: argparse.ArgumentParser) -> None:
    """The memory options for large images (graphflow.models.memory): run options like --device."""
    run.add_argument("--vae-tiling", action="store_true",
                     help="encode and decode in overlapping tiles: large images in bounded memory (changes pixels)")
    run.add_argument("--vae-tile-size", type=_positive("pixels"), default=None, metavar="PX",
                     help="with --vae-tiling: the tile size in pixels (default: the VAE's, 512 for SD1.5)")
    run.add_argument("--vae-slicing", action="store_true", help="encode and decode a batch one image at a time")
    run.add_argument("--swap-controlnets", action="store_true",
                     help="hold each ControlNet on the device only inside its guidance window (same pixels)")
    run.add_argument("--attention-slicing", type=_slice_size, nargs="?", const="auto", default=None,
                     metavar="auto|max|N", help="compute UNet and ControlNet attention in slices (default when given: "
                     "auto, half the heads at a time; max: one; N: N heads per slice)")


def _slice_size(text: str) -> str | int:
    return text if text in ("auto", "max") else _positive("attention heads per slice")(text)


def _memory_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"vae_tiling": args.vae_tiling, "vae_tile_size": args.vae_tile_size, "vae_slicing": args.vae_slicing,
            "attention_slicing": args.attention_slicing, "swap_controlnets": args.swap_controlnets}


def _positive(unit: str) -> Callable[[str], int]:
    """An argparse type: a positive whole number of `unit`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number of {unit}, found {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number of {unit}, found {value}")
        return value

    return parse


_megabytes = _positive("megabytes")


def _input_directory(text: str) -> Path:
    """An argparse type: an existing directory this process can list and read."""
    try:
        resolved = Path(text).resolve(strict=True)
        problem = None if resolved.is_dir() else "is a file, not a directory"
        if problem is None and not os.access(resolved, os.R_OK | os.X_OK):
            problem = "cannot be read (permission denied)"
    except FileNotFoundError:
        problem = "does not exist"
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop (Python < 3.13)
        problem = f"is not a usable path ({error})"
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text} {problem}")
    return Path(text)


def _output_directory(text: str) -> Path:
    """An argparse type: a directory this process can write in, or a path where one can be made."""
    try:
        resolved = Path(text).resolve()
        existing = next(path for path in (resolved, *resolved.parents) if path.exists())
        problem = None if existing.is_dir() else f"cannot be made: {existing} is a file, not a directory"
        if problem is None and not os.access(existing, os.W_OK | os.X_OK):
            problem = f"cannot be written: {existing} is not writable (permission denied)"
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop (Python < 3.13)
        problem = f"is not a usable path ({error})"
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text} {problem}")
    return Path(text)


def _add_input_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-dir", action="append", type=_input_directory, default=None, metavar="DIR",
                        help="another directory input files may come from (repeatable); a relative path is looked "
                             "up in the document's folder, then in each --input-dir, then in the current directory")


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="assignments",
                        help="give a template param a value (repeatable)")
