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

`--lora [FILE]` adds a LoraLoader (strength_model/strength_clip `--lora-strength`) on both sides: the pipeline gets
`load_lora_weights` + `set_adapters` once, before the runs; graphflow applies the LoRA on each use of the UNet and
text encoder (the first injects it, later ones put the kept layers back). Without FILE a tiny random LoRA is made for
the tiny checkpoint. The first graphflow run with the LoRA (the injection) is timed and printed too.
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
    parser.add_argument("--lora", nargs="?", const="tiny", default=None,
                        help="add a LoRA (a .safetensors file; no value: a tiny random one for tiny:sd15)")
    parser.add_argument("--lora-strength", type=float, nargs=2, default=(0.8, 0.6), metavar=("MODEL", "CLIP"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if args.checkpoint.startswith("tiny:") else "0")

    import numpy as np
    import torch

    from graphflow import Engine
    from graphflow.models import resolve_device, resolve_dtype, torch_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    with tempfile.TemporaryDirectory() as out:
        lora = None if args.lora is None else Path(args.lora) if args.lora != "tiny" else \
            _tiny_lora(args.checkpoint, Path(out) / "lora")
        graph = GRAPH if lora is None else _with_lora(str(lora), *args.lora_strength)
        engine = Engine(input_dirs=[ROOT, *([lora.parent] if lora else [])], output_dir=out,
                        options={"device": device, "dtype": dtype})
        base = {"checkpoint": args.checkpoint, "controlnet": args.controlnet, "width": args.size,
                "height": args.size, "steps": args.steps, "photo": str(GRAPH.parent / _default("photo"))}
        first = engine.run(graph if lora is None else GRAPH, {**base, "prompt": "warm-up", "seed": 1000},
                           outputs=["image", "edges"])
        edges = first.outputs["edges"]
        pipe = _pipeline(args.checkpoint, args.controlnet, device, torch_dtype(dtype))
        if lora is not None:
            _load_lora(pipe, lora, *args.lora_strength)
            _sync(device)
            started = time.perf_counter()
            engine.run(graph, {**base, "prompt": "warm-up with the LoRA", "seed": 1001}, outputs=["image"])
            _sync(device)
            print(f"first graphflow run with the LoRA (injects it): {time.perf_counter() - started:.3f} s")
        control = _pil(edges[0])

        def run_graphflow(index: int) -> np.ndarray:
            params = {**base, "prompt": f"a modern living room, variation {index}", "seed": index}
            return (engine.run(graph, params, outputs=["image"]).outputs["image"][0].cpu().numpy() * 255).round()

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
    with_lora = "" if args.lora is None else f" + LoRA {args.lora} at {args.lora_strength[0]}/{args.lora_strength[1]}"
    print(f"{args.checkpoint} + {args.controlnet}{with_lora}, {args.size}x{args.size}, {args.steps} steps, {device} "
          f"{dtype}, median of {args.repeats}")
    print(f"graphflow {ours:.3f} s   diffusers {theirs:.3f} s   ratio {ours / theirs:.3f} (target <= 1.02)   "
          f"images identical: {identical}")


def _default(name: str) -> object:
    import json

    return json.loads(GRAPH.read_text())["params"][name]["default"]


def _with_lora(lora: str, strength_model: float, strength_clip: float) -> dict:
    """The graph with a LoraLoader between the checkpoint and its MODEL and CLIP users."""
    import json

    document = json.loads(GRAPH.read_text())
    nodes = document["nodes"]
    for node in nodes.values():
        for name, value in node["inputs"].items():
            if value in ({"from": "sd.model"}, {"from": "sd.clip"}):
                node["inputs"][name] = {"from": value["from"].replace("sd.", "lora.")}
    nodes["lora"] = {"type": "LoraLoader", "inputs": {
        "model": {"from": "sd.model"}, "clip": {"from": "sd.clip"}, "lora": lora, "strength_model": strength_model,
        "strength_clip": strength_clip}}
    return document


def _load_lora(pipe: object, lora: Path, strength_model: float, strength_clip: float) -> None:
    """diffusers' way: load_lora_weights + set_adapters, once."""
    import importlib.metadata

    import transformers.integrations.peft as transformers_peft
    from packaging.version import Version

    if Version(importlib.metadata.version("peft")) < Version(transformers_peft.MIN_PEFT_VERSION):
        # transformers 5.24 asks for peft >= 0.22 (PyPI's newest is 0.21) with the code 5.23 ran on peft >= 0.20;
        # graphflow does not go through this check (graphflow.models.patches), diffusers' text encoder loading does
        transformers_peft.check_peft_version = lambda min_version: None
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="lora")
    pipe.set_adapters(["lora"], adapter_weights=[{"unet": strength_model, "text_encoder": strength_clip}])


def _tiny_lora(checkpoint: str, folder: Path) -> Path:
    """A random rank-4 LoRA on the tiny checkpoint's UNet attention and text encoder, saved like diffusers'
    training scripts save one."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from graphflow.models.sources import locate
    from graphflow.paths import PathPolicy

    path = locate(checkpoint, PathPolicy.create([ROOT]), node="benchmark", input="checkpoint", pipeline=True).path
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    generator = torch.Generator().manual_seed(0)
    layers = {}
    for name, module, targets in (("unet", pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"]),
                                  ("text_encoder", pipe.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"])):
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=targets), module)
        state = get_peft_model_state_dict(module)
        with torch.no_grad():
            for tensor in state.values():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(state)
    StableDiffusionPipeline.save_lora_weights(folder, weight_name="lora.safetensors", **layers)
    return folder / "lora.safetensors"


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
