"""ControlNet training throughput: samples per second and seconds per optimizer step of `train_controlnet`.

Trains on the generated circles dataset (graphflow.training.circles) in a temporary folder, one warm-up run of two
steps first (imports, first-call costs), then the measured run; checkpoints and validation are off, so the numbers
are the training loop's own (data loading included). Prints the loss at a few steps too.

    python benchmarks/train_controlnet.py                         # tiny offline SD1.5, 64 px, batch 4, CPU
    python benchmarks/train_controlnet.py --threads 1             # one torch thread (faster on 2 busy cores)
    python benchmarks/train_controlnet.py --base-model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --resolution 512 --batch-size 4 --mixed-precision fp16 --device cuda --conditioning-channels ""
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="tiny:sd15")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--conditioning-channels", default="8,8,16,16",
                        help="the ControlNet's control-image encoder channels; empty: diffusers' default")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if args.base_model.startswith("tiny:") else "0")

    import torch

    from graphflow.training import StepReport, TrainConfig, train_controlnet
    from graphflow.training.circles import write_circles_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    channels = tuple(int(part) for part in args.conditioning_channels.split(",")) if args.conditioning_channels \
        else None
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data = write_circles_dataset(root / "data", count=args.examples, size=args.resolution)
        config = TrainConfig(base_model=args.base_model, data=data, out=root / "warm-up", steps=2,
                             batch_size=args.batch_size, learning_rate=args.learning_rate,
                             resolution=args.resolution, mixed_precision=args.mixed_precision, device=args.device,
                             conditioning_channels=channels, checkpoint_every=0, input_dirs=(root,), progress=False)
        train_controlnet(config)
        reports: list[StepReport] = []
        result = train_controlnet(replace(config, out=root / "measured", steps=args.steps), on_step=reports.append)
    steady = [report.seconds for report in reports[1:]] or [reports[0].seconds]
    print(f"train_controlnet: {args.base_model}, {args.resolution} px, batch {args.batch_size}, {args.steps} steps, "
          f"{torch.get_num_threads()} torch threads, device {args.device}, mixed precision {args.mixed_precision}")
    print(f"  {result.samples_per_second:.2f} samples/s, {result.seconds_per_step:.3f} s per step "
          f"(median {statistics.median(steady):.3f} s after the first)")
    shown = sorted({1, len(result.losses) // 4, len(result.losses) // 2, len(result.losses)} - {0})
    print("  loss " + ", ".join(f"step {step}: {result.losses[step - 1]:.3f}" for step in shown))


if __name__ == "__main__":
    main()
