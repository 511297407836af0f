"""graphflow's Canny ControlNet graph against the equivalent diffusers pipeline, side by side.

Both use the same model files, prompt, control image, seed, scheduler and steps. Runs alternate
(graphflow, diffusers, graphflow, ...) in one process so both see the same machine state; each
graphflow run uses a new prompt and seed, so it re-encodes, samples and decodes like the
pipeline call does (edge detection and model loading are cached, as in the pipeline, where the
control image is prepared once). Prints the median seconds of each and the ratio
graphflow / diffusers (target <= 1.02), and whether the images are identical.

    python benchmarks/sampler_vs_diffusers.py                       # tiny offline models
    python benchmarks/sampler_vs_diffusers.py --checkpoint stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --controlnet lllyasviel/sd-controlnet-canny --size 512 --steps 30 --dtype fp16
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

GRAPH = Path(__file__).resolve().parent.parent / "graphs" / "controlnet_canny.json"
ROOT = GRAPH.parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="tiny:sd15")
    parser.add_argument("--controlnet", default="tiny:controlnet-canny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if args.checkpoint.startswith("tiny:") else "0")

    import numpy as np
    import torch

    from graphflow import Engine
    from graphflow.models import resolve_device, resolve_dtype, torch_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    with tempfile.TemporaryDirectory() as out:
        engine = Engine(input_dirs=[ROOT], output_dir=out, options={"device": device, "dtype": dtype})
        base = {"checkpoint": args.checkpoint, "controlnet": args.controlnet, "width": args.size,
                "height": args.size, "steps": args.steps}
        first = engine.run(GRAPH, {**base, "prompt": "warm-up", "seed": 1000}, outputs=["image", "edges"])
        edges = first.outputs["edges"]
        pipe = _pipeline(args.checkpoint, args.controlnet, device, torch_dtype(dtype))
        control = _pil(edges[0])

        def run_graphflow(index: int) -> np.ndarray:
            params = {**base, "prompt": f"a modern living room, variation {index}", "seed": index}
            return (engine.run(GRAPH, params, outputs=["image"]).outputs["image"][0].cpu().numpy() * 255).round()

        def run_diffusers(index: int) -> np.ndarray:
            generator = torch.Generator("cpu").manual_seed(index)
            image = pipe(f"a modern living room, variation {index}", image=control,
                         negative_prompt=_default("negative"), num_inference_steps=args.steps,
                         guidance_scale=_default("cfg"), height=args.size, width=args.size, generator=generator,
                         output_type="np").images[0]
            return (image * 255).round()

        run_graphflow(0), run_diffusers(0)  # warm-up both paths
        times: dict[str, list[float]] = {"graphflow": [], "diffusers": []}
        identical = True
        for index in range(1, args.repeats + 1):
            images = {}
            for name, run in (("graphflow", run_graphflow), ("diffusers", run_diffusers)):
                _sync(device)
                started = time.perf_counter()
                images[name] = run(index)
                _sync(device)
                times[name].append(time.perf_counter() - started)
            identical &= bool(np.array_equal(images["graphflow"], images["diffusers"]))
    ours, theirs = statistics.median(times["graphflow"]), statistics.median(times["diffusers"])
    print(f"{args.checkpoint} + {args.controlnet}, {args.size}x{args.size}, {args.steps} steps, {device} {dtype}, "
          f"median of {args.repeats}")
    print(f"graphflow {ours:.3f} s   diffusers {theirs:.3f} s   ratio {ours / theirs:.3f} (target <= 1.02)   "
          f"images identical: {identical}")


def _default(name: str) -> object:
    import json

    return json.loads(GRAPH.read_text())["params"][name]["default"]


def _pipeline(checkpoint: str, controlnet: str, device: str, dtype: object) -> object:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from graphflow.models.sources import locate
    from graphflow.paths import PathPolicy

    paths = PathPolicy.create([ROOT])
    model = locate(checkpoint, paths, node="benchmark", input="checkpoint", pipeline=True).path
    net = locate(controlnet, paths, node="benchmark", input="controlnet", pipeline=False).path
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        model, controlnet=ControlNetModel.from_pretrained(net, dtype=dtype), dtype=dtype,
        safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _pil(image: object) -> object:
    from PIL import Image

    return Image.fromarray((image.cpu().numpy() * 255).round().astype("uint8"))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
