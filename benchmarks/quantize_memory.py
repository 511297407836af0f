"""Model memory saved by the loaders' `quantize` input, and what it costs in pixels and time, side by side.

One engine renders the same ControlNet graph (CheckpointLoader -> TextEncode -> ControlApply -> Sampler ->
VAEDecode) once in full precision and once per backend and mode; for each it prints the bytes the model manager
counts for the quantised parts (UNet, text encoders, ControlNet; the VAE is never quantised) before and after, their
ratio, the largest pixel difference from the full-precision render (on a 0..1 scale) and the seconds of the run
(loading and quantising included; after a warm-up run in another model manager, so imports count for none).
Variants whose backend is not installed, or that need a GPU, are listed as skipped with the reason.

    python benchmarks/quantize_memory.py                             # tiny offline SD1.5 + Canny ControlNet, CPU
    python benchmarks/quantize_memory.py --device cuda --checkpoint stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --controlnet lllyasviel/sd-controlnet-canny --size 512 --steps 20
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = (("torchao", "int8"), ("torchao", "fp8"), ("torchao", "int4"), ("quanto", "int8"), ("quanto", "fp8"),
            ("quanto", "int4"), ("bitsandbytes", "int8"), ("bitsandbytes", "nf4"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="tiny:sd15")
    parser.add_argument("--controlnet", default="tiny:controlnet-canny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if args.checkpoint.startswith("tiny:") else "0")
    from graphflow.errors import NodeExecutionError

    warm, folder = _engine(args.device)
    warm.run(_graph(args, folder, "none", "auto"))  # imports and first-call costs, in a manager of its own
    engine, folder = _engine(args.device)
    start = time.perf_counter()
    full = engine.run(_graph(args, folder, "none", "auto"))
    seconds = time.perf_counter() - start
    before = _bytes(engine, full.outputs)
    print(f"quantised UNet + text encoders + ControlNet of {args.checkpoint} / {args.controlnet}, {args.size} px, "
          f"{args.steps} steps, {args.device}")
    print(f"{'backend':<13} {'mode':<5} {'bytes before':>13} {'bytes after':>12} {'ratio':>6} {'max error':>10} "
          f"{'seconds':>8}")
    print(f"{'(none)':<13} {'fp32' if args.device == 'cpu' else '':<5} {before:>13,} {before:>12,} {1:>6.3f} "
          f"{0:>10.4f} {seconds:>8.2f}")
    for backend, mode in VARIANTS:
        start = time.perf_counter()
        try:
            result = engine.run(_graph(args, folder, mode, backend))
        except NodeExecutionError as error:
            print(f"{backend:<13} {mode:<5} skipped: {_reason(error)}")
            continue
        seconds = time.perf_counter() - start
        after = _bytes(engine, result.outputs)
        error = float((result.outputs["image"] - full.outputs["image"]).abs().max())
        print(f"{backend:<13} {mode:<5} {before:>13,} {after:>12,} {after / before:>6.3f} {error:>10.4f} "
              f"{seconds:>8.2f}")


def _engine(device: str) -> tuple[Any, Path]:
    import numpy as np
    from PIL import Image

    from graphflow import Engine
    from graphflow.models import ModelManager

    folder = Path(tempfile.mkdtemp(prefix="quantize-benchmark-"))
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[16:48, 16], edges[16:48, 47], edges[16, 16:48], edges[47, 16:48] = 255, 255, 255, 255
    Image.fromarray(edges).save(folder / "edges.png")
    return Engine(input_dirs=[folder], models=ModelManager(), options={"device": device}), folder


def _graph(args: argparse.Namespace, folder: Path, mode: str, backend: str) -> Any:
    from graphflow import Graph
    from nodes import CheckpointLoader, ControlApply, ControlNetLoader, LoadImage, Sampler, TextEncode, VAEDecode

    graph = Graph("quantize-benchmark")
    quantize = {"quantize": mode, "quantize_backend": backend}
    sd = graph.add(CheckpointLoader(model=args.checkpoint, **quantize), "sd")
    net = graph.add(ControlNetLoader(model=args.controlnet, **quantize), "controlnet")
    control = ControlApply(controlnet=net.controlnet, image=LoadImage(path="edges.png").image).control
    sampled = Sampler(model=sd.model, positive=TextEncode(clip=sd.clip, text="a reading corner").conditioning,
                      control=[control], seed=7, steps=args.steps, width=args.size, height=args.size)
    graph.output("image", graph.add(VAEDecode(vae=sd.vae, latent=sampled.latent)).image)
    graph.output("model", sd.model)
    graph.output("clip", sd.clip)
    graph.output("controlnet", net.controlnet)
    return graph


def _bytes(engine: Any, outputs: dict[str, Any]) -> int:
    """What the model manager counts for the quantisable parts of this run's models."""
    from graphflow.models.manager import module_bytes

    handles = [outputs["model"].unet, *outputs["clip"].encoders, outputs["controlnet"].controlnet]
    total = 0
    for handle in handles:
        with handle.use() as module:
            total += module_bytes(module)
    return total


def _reason(error: Exception) -> str:
    cause = str(getattr(error, "cause", error))
    return cause.split("; ")[0] if len(cause) > 110 else cause


if __name__ == "__main__":
    main()
