"""Model bytes on the device and time of a three-ControlNet render with guidance windows, with and without
`swap_controlnets`, side by side in one process.

The ControlNets guide 0-30 %, 30-70 % and 70-100 % of the steps. The benchmark samples the model manager's
device bytes (as its budget counts them) at every Sampler step and prints the most ControlNets on the device at
once, the peak model bytes on the device, the seconds per run (median) and the ratios; the images are checked
equal.

    python benchmarks/controlnet_swapping.py                      # tiny offline models, CPU
    python benchmarks/controlnet_swapping.py --device cuda --size 512 \
        --checkpoint stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --controlnets lllyasviel/sd-controlnet-canny lllyasviel/sd-controlnet-depth lllyasviel/sd-controlnet-openpose
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

WINDOWS = ((0.0, 0.3), (0.3, 0.7), (0.7, 1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="tiny:sd15")
    parser.add_argument("--controlnets", nargs=3, default=["tiny:controlnet-canny", "tiny:controlnet-depth",
                                                           "tiny:controlnet-pose"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if args.checkpoint.startswith("tiny:") else "0")
    results = {swap: measure(args, swap) for swap in (False, True)}
    held, swapped = results[False], results[True]
    print(f"3 ControlNets with windows {WINDOWS}, {args.size}x{args.size}, {args.steps} steps ({args.device})")
    print(f"{'variant':<18} {'ControlNets on device':>22} {'peak model MiB':>15} {'seconds':>8}")
    for name, result in (("all held", held), ("swap_controlnets", swapped)):
        print(f"{name:<18} {result['controlnets']:>22} {result['peak'] / 2**20:>15.2f} {result['seconds']:>8.3f}")
    print(f"ratio swapped / held: peak model bytes {swapped['peak'] / held['peak']:.2f}, "
          f"time {swapped['seconds'] / held['seconds']:.2f}; images equal: {held['image'] == swapped['image']}")


def measure(args: argparse.Namespace, swap: bool) -> dict[str, Any]:
    from graphflow import Engine
    from graphflow.events import NodeProgress
    from graphflow.models import ModelManager

    engine = Engine(input_dirs=[Path.cwd()], output_dir=tempfile.mkdtemp(), models=ModelManager(),
                    options={"device": args.device, "swap_controlnets": swap})
    peaks = {"controlnets": 0, "peak": 0}  # most ControlNets on the device at once, most model bytes there

    def watch(event: object) -> None:
        if isinstance(event, NodeProgress) and event.node == "sample":
            models = engine.models
            on_device = sum(key.kind == "controlnet" for key in models.on_device())
            peaks["controlnets"] = max(peaks["controlnets"], on_device)
            peaks["peak"] = max(peaks["peak"], models.device_bytes)

    seconds, image = [], None
    for _ in range(args.repeat):
        engine.cache.clear()
        started = time.perf_counter()
        image = engine.run(graph(args), on_event=watch).outputs["image"]
        seconds.append(time.perf_counter() - started)
    return {**peaks, "seconds": statistics.median(seconds), "image": image.numpy().tobytes()}


def graph(args: argparse.Namespace) -> dict[str, Any]:
    nodes: dict[str, Any] = {
        "photo": {"type": "LoadImage", "inputs": {"path": "graphs/assets/room.png"}},
        "edges": {"type": "Canny", "inputs": {"image": {"from": "photo.image"}, "width": args.size,
                                              "height": args.size}},
        "sd": {"type": "CheckpointLoader", "inputs": {"model": args.checkpoint}},
        "positive": {"type": "TextEncode", "inputs": {"clip": {"from": "sd.clip"}, "text": "a reading corner"}},
    }
    controls = []
    for index, (source, (start, end)) in enumerate(zip(args.controlnets, WINDOWS, strict=True)):
        nodes[f"cn{index}"] = {"type": "ControlNetLoader", "inputs": {"model": source}}
        nodes[f"control{index}"] = {"type": "ControlApply", "inputs": {
            "controlnet": {"from": f"cn{index}.controlnet"}, "image": {"from": "edges.image"}, "start": start,
            "end": end}}
        controls.append({"from": f"control{index}.control"})
    nodes["sample"] = {"type": "Sampler", "inputs": {"model": {"from": "sd.model"},
                                                     "positive": {"from": "positive.conditioning"},
                                                     "control": controls, "steps": args.steps, "scheduler": "euler"}}
    nodes["decode"] = {"type": "VAEDecode", "inputs": {"vae": {"from": "sd.vae"}, "latent": {"from": "sample.latent"}}}
    return {"graphflow": 1, "nodes": nodes, "outputs": {"image": "decode.image"}}


if __name__ == "__main__":
    main()
