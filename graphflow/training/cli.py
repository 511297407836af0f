"""`graphflow train-controlnet`: the command-line face of `train_controlnet`, nothing more.

    graphflow train-controlnet --base-model stable-diffusion-v1-5/stable-diffusion-v1-5 --data DATA --out OUT \\
        [--steps N] [--batch-size N] [--learning-rate LR] [--resolution PX] [--mixed-precision no|fp16|bf16] \\
        [--control-template graphs/templates/canny_control.json] [--validate-every K] [--resume]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphflow.errors import GraphflowError, printable
from graphflow.training.config import DEVICES, MIXED_PRECISION, TrainConfig

if TYPE_CHECKING:
    from graphflow.registry import NodeRegistry
    from graphflow.training.controlnet import TrainResult


_DESCRIPTION = """Train a ControlNet, initialised from the base model's UNet, on (target, control, prompt) examples.

Writes OUT/checkpoint-STEP/ (resumable with --resume), OUT/validation/step-STEP/*.png and the final OUT/controlnet/,
which ControlNetLoader loads. Example, on graphflow's tiny offline models:

    graphflow train-controlnet --base-model tiny:sd15 --data DATA --out OUT --steps 20 --resolution 64 \\
        --learning-rate 1e-2 --control-template graphs/templates/canny_control.json --validate-every 10
"""


def add_train_controlnet(commands: Any) -> None:
    """Add the `train-controlnet` subcommand to the `graphflow` command's subparsers."""
    train = commands.add_parser("train-controlnet", help="train a ControlNet on a frozen SD1.5-family base model",
                                description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig(base_model="", data=Path(), out=Path())
    train.add_argument("--base-model", required=True, help="hub id, local diffusers folder or tiny:sd15")
    train.add_argument("--data", type=Path, required=True,
                       help="dataset folder (images/NAME.png + images/NAME.txt + conditioning/NAME.png) or JSONL file "
                            "(image, conditioning_image, text per line)")
    train.add_argument("--out", type=Path, required=True, help="where checkpoints, validation images and the "
                                                               "final controlnet/ go")
    for name, kind, help_text in _NUMBERS:
        train.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name),
                           help=f"{help_text} (default: {getattr(defaults, name)})")
    train.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="no",
                       help="train in this half precision with accelerate's mixed precision (default: no, fp32)")
    train.add_argument("--device", choices=DEVICES, default="auto",
                       help="where to train (default: auto, a GPU when there is one)")
    train.add_argument("--conditioning-channels", type=_channels, default=None, metavar="C1,C2,...",
                       help="channels of the ControlNet's control-image encoder (default: diffusers' 16,32,96,256)")
    train.add_argument("--control-template", type=Path, default=None,
                       help="make the control images from the targets with this template (one IMAGE param)")
    train.add_argument("--control-set", action="append", default=[], metavar="NAME=VALUE",
                       help="a param value for the control template (repeatable)")
    train.add_argument("--keep-checkpoints", type=int, default=None, help="keep only the latest N checkpoints")
    train.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                       help="continue from the latest checkpoint in --out (or this one); starts afresh if none")
    train.add_argument("--validation-image", action="append", type=Path, default=[], dest="validation_images",
                       help="control image to render at each validation (repeatable; default: the first example's)")
    train.add_argument("--validation-prompt", action="append", default=[], dest="validation_prompts",
                       help="prompt for the validation images (repeatable)")
    train.add_argument("--validation-graph", type=Path, default=None,
                       help="graph to render validation images with (default: graphflow's own)")
    train.add_argument("--input-dir", action="append", type=Path, default=[], dest="input_dirs", metavar="DIR",
                       help="directory files may be read from (default: the current directory; repeatable)")
    train.add_argument("--cache-dir", type=Path, default=None, help="keep the control template's results here")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(command=run_train_controlnet)


_NUMBERS = (
    ("steps", int, "optimizer steps to train"),
    ("batch_size", int, "examples per micro-batch"),
    ("gradient_accumulation_steps", int, "micro-batches per optimizer step"),
    ("learning_rate", float, "AdamW learning rate"),
    ("warmup_steps", int, "steps of linear learning-rate warm-up"),
    ("max_grad_norm", float, "clip gradients to this norm (0: no clipping)"),
    ("resolution", int, "square training size in pixels, a multiple of 8"),
    ("seed", int, "seed of the example order, noise and timesteps"),
    ("checkpoint_every", int, "write a checkpoint every N steps (0: only at the end and when validating)"),
    ("validate_every", int, "render validation images every N steps (0: never)"),
    ("validation_steps", int, "denoising steps of each validation image"),
)


def _channels(text: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected channel counts like 16,32,96,256, found {text!r}") from None
    if not channels or min(channels) <= 0:
        raise argparse.ArgumentTypeError(f"channel counts must be positive, found {text!r}")
    return channels


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the command line asks for; template params are parsed by the template's param types."""
    from graphflow.document import load_document
    from graphflow.templates import parse_assignments

    control_params: dict[str, Any] = {}
    if args.control_set:
        template = args.control_template
        if template is None:
            raise GraphflowError("--control-set gives params of --control-template, which is not set")
        control_params = parse_assignments(load_document(template), args.control_set)
    numbers = {name: getattr(args, name) for name, _, _ in _NUMBERS}
    return TrainConfig(
        base_model=args.base_model, data=args.data, out=args.out, **numbers, mixed_precision=args.mixed_precision,
        device=args.device, conditioning_channels=args.conditioning_channels, control_template=args.control_template,
        control_params=control_params, keep_checkpoints=args.keep_checkpoints,
        resume=args.resume if args.resume is True or args.resume is False else Path(args.resume),
        validation_images=tuple(args.validation_images), validation_prompts=tuple(args.validation_prompts),
        validation_graph=args.validation_graph, input_dirs=tuple(args.input_dirs), cache_dir=args.cache_dir,
        progress=not args.quiet)


def run_train_controlnet(args: argparse.Namespace, registry: NodeRegistry) -> int:
    """Train, print what came of it; exit 1 for settings or data that cannot work, 130 when interrupted."""
    from graphflow.training.controlnet import train_controlnet

    try:
        result = train_controlnet(config_from_args(args))
    except (GraphflowError, OSError) as error:  # OSError: an output folder that cannot be written, a full disk
        lines = "\n".join(printable(line, limit=None) for line in str(error).split("\n"))  # each line escaped
        print(f"error: {lines}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: the checkpoints in {printable(str(args.out))} stay; continue with --resume",
              file=sys.stderr)
        return 130
    print(summary(result))
    return 0


def summary(result: TrainResult) -> str:
    """A few lines on a finished run: the loss curve's ends, the throughput, where things were written."""
    losses = result.losses
    lines = [f"trained {result.steps} steps: loss {losses[0]:.4f} at step 1, {losses[-1]:.4f} at step {len(losses)}"]
    if result.samples_per_second:
        lines.append(f"  {result.samples_per_second:.2f} samples/s, {result.seconds_per_step:.3f} s per step")
    lines.append(f"  ControlNet: {printable(str(result.controlnet))}")
    lines.extend(f"  checkpoint: {printable(str(path))}" for path in result.checkpoints)
    lines.extend(f"  validation: {printable(str(path))}" for path in result.validation_images)
    return "\n".join(lines)
