"""What a re-run costs after each kind of edit to the Canny ControlNet graph.

Runs graphs/controlnet_canny.json on one Engine: a full run, the identical run again, then
re-runs after changing the prompt, the seed, the ControlNet scale and a Canny threshold. For each it prints the
seconds, the ratio to the full run and which nodes ran. Only the nodes downstream of the
change should run: a new prompt re-encodes and re-samples but never re-detects edges; a new
seed or scale re-samples only.

    python benchmarks/incremental.py                       # tiny offline models, 128x96
    python benchmarks/incremental.py --checkpoint stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --controlnet lllyasviel/sd-controlnet-canny --width 512 --height 512 --steps 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from graphflow import Engine

GRAPH = Path(__file__).resolve().parent.parent / "graphs" / "controlnet_canny.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="tiny:sd15")
    parser.add_argument("--controlnet", default="tiny:controlnet-canny")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if args.checkpoint.startswith("tiny:") else "0")

    base = {"checkpoint": args.checkpoint, "controlnet": args.controlnet, "width": args.width,
            "height": args.height, "steps": args.steps, "prefix": "incremental"}
    # each repeat edits to new values, so every edited run really re-runs; medians over the repeats
    edits: list[tuple[str, Callable[[int], dict[str, object]]]] = [
        ("full run", lambda r: {}), ("identical re-run", lambda r: {}),
        ("prompt changed", lambda r: {"prompt": f"a cosy library at night, variation {r}"}),
        ("seed changed", lambda r: {"seed": 1 + r}),
        ("ControlNet scale changed", lambda r: {"scale": 0.6 - 0.05 * r}),
        ("Canny threshold changed", lambda r: {"low": 60 + r}),
    ]
    seconds: dict[str, list[float]] = {label: [] for label, _ in edits}
    ran: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as out:
        engine = Engine(input_dirs=[GRAPH.parent.parent], output_dir=out,
                        options={"device": args.device, "dtype": args.dtype})
        engine.run(GRAPH, {**base, "seed": 99})  # loads the models once; not what is measured
        for repeat in range(args.repeats):
            engine.cache.clear()
            params = dict(base)
            for label, change in edits:
                params.update(change(repeat))
                result = engine.run(GRAPH, params)
                seconds[label].append(result.seconds)
                ran[label] = result.ran
    full = statistics.median(seconds["full run"])
    print(f"{args.checkpoint} + {args.controlnet}, {args.width}x{args.height}, {args.steps} steps, "
          f"median of {args.repeats}")
    print(f"{'run':<26} {'seconds':>8} {'ratio':>6}  nodes that ran")
    for label, _ in edits:
        median = statistics.median(seconds[label])
        print(f"{label:<26} {median:8.4f} {median / full:6.3f}  {', '.join(ran[label]) or '(none)'}")


if __name__ == "__main__":
    main()
