"""Peak memory and time of a VAE decode with and without the memory options, side by side.

Each variant runs in a fresh process (so one's allocations never hide another's peak): it loads the VAE, decodes a
small latent once to warm up, then decodes a random latent of --size pixels with VAEDecode's decode and the run
options of the variant. On a GPU it reports torch's peak allocated bytes during that decode; on the CPU the rise of
the process's peak resident memory (Linux's VmHWM, reset before the decode) over what it held before.

    python benchmarks/vae_memory.py                      # tiny offline SD1.5 VAE, 256 px, CPU
    python benchmarks/vae_memory.py --size 1024 --device cuda --vae stable-diffusion-v1-5/stable-diffusion-v1-5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "default": {},
    "vae_tiling": {"vae_tiling": True},
    "vae_tiling, 128 px tiles": {"vae_tiling": True, "vae_tile_size": 128},
    "vae_slicing (batch 2)": {"vae_slicing": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default="tiny:sd15", help="a checkpoint (its VAE is decoded with)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if args.vae.startswith("tiny:") else "0")
    if args.child is not None:
        print(json.dumps(measure(args, json.loads(args.child))))
        return
    print(f"VAE decode of {args.batch} x {args.size}x{args.size} px ({args.vae}, {args.device})")
    print(f"{'variant':<28} {'peak MiB':>9} {'seconds':>8}")
    for name, options in VARIANTS.items():
        command = [sys.executable, __file__, "--vae", args.vae, "--size", str(args.size), "--batch", str(args.batch),
                   "--device", args.device, "--child", json.dumps(options)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"{name:<28} {result['peak'] / 2**20:>9.1f} {result['seconds']:>8.2f}")


def measure(args: argparse.Namespace, options: dict[str, object]) -> dict[str, float]:
    import time

    import torch

    from graphflow import Engine, Graph
    from graphflow.models.memory import memory_options
    from nodes import CheckpointLoader
    from nodes.latents import Latent, decode

    graph = Graph("vae")
    graph.output("vae", graph.add(CheckpointLoader(model=args.vae)).vae)
    with tempfile.TemporaryDirectory() as out:
        vae = Engine(output_dir=out, options={"device": args.device}).run(graph).outputs["vae"]
    scale, channels = vae.scale, vae.latent_channels
    side = args.size // scale
    memory = memory_options(options)
    cuda = args.device.startswith("cuda")
    with torch.no_grad():
        decode(vae, Latent(torch.randn(1, channels, 8, 8), scale=scale), memory)  # loads the weights, warms up
        latent = Latent(torch.randn(args.batch, channels, side, side, generator=torch.Generator().manual_seed(0)),
                        scale=scale)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident size starts again from now
            before = _resident_bytes()
        started = time.perf_counter()
        decode(vae, latent, memory)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_resident_bytes()
    return {"peak": max(peak - before, 0), "seconds": seconds}


def _resident_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _peak_resident_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


if __name__ == "__main__":
    main()
