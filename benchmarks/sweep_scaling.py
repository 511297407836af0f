"""A local four-seed ArchViz sweep against the diffusers script that calls the pipeline four times, side by side.

graphflow: `run_sweep` over graphs/archviz_four_seeds.json with `seeds` one value per job ([0], [1], [2], [3]) on
one Engine, from cold (a new model manager): models load once, edges, depth and the prompt encoding run in the first
job only, each later job samples, decodes and saves. diffusers: the guide's script, from cold too: load the
StableDiffusionControlNetPipeline with the edges and depth ControlNets, make the two control images once (with
graphflow's Canny and Depth nodes, the same work the sweep does), then one pipeline call per seed, each saved as a
PNG. Both sides are warmed up once first (imports, kernels), untimed. Prints each wall time, the ratio
graphflow / diffusers, which nodes each job ran, and whether the images are identical.

Part (b), `--part ray`: an 8-job sweep (8 seeds of graphs/controlnet_canny.json) on 1 and on 2 Ray actors of one
torch thread each, both warmed first (models loaded, shared nodes cached: the timed sweeps sample, decode and save),
as wall times and the speed-up. Part (c), also `--part ray`: the Ray backend's overhead per job against the local
backend on a trivial graph (two arithmetic nodes), 100 jobs each. Ray needs the graphflow[ray] extra; on a machine
without outside network, run it in a loopback-only namespace (see ../shared/NOTES.md):

    python benchmarks/sweep_scaling.py                       # (a), tiny offline models (made in a temporary folder)
    python benchmarks/sweep_scaling.py --real --width 512 --height 384 --steps 30 --dtype fp16
    unshare -n sh -c 'ip link set lo up && python benchmarks/sweep_scaling.py --part ray'   # (b) and (c)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GRAPH = ROOT / "graphs" / "archviz_four_seeds.json"
TEMPLATE = ROOT / "graphs" / "templates" / "archviz.json"  # the graph's one node: its outputs include the prompt
TINY = {"checkpoint": "tiny:sd15", "canny_controlnet": "tiny:controlnet-canny",
        "depth_controlnet": "tiny:controlnet-depth", "depth_model": "tiny:dpt"}
SEEDS = (0, 1, 2, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="the template's hub models instead of tiny ones")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--style", default="industrial")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--part", choices=("local", "ray", "all"), default="local",
                        help="local: (a); ray: (b) and (c); all: every part")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "0" if args.real else "1")
    with tempfile.TemporaryDirectory() as work:
        if not args.real and "GRAPHFLOW_TINY_MODELS" not in os.environ:
            from graphflow.models.tiny import make_tiny_models

            os.environ["GRAPHFLOW_TINY_MODELS"] = str(make_tiny_models(Path(work) / "tiny"))
        if args.part in ("local", "all"):
            _archviz(args, Path(work))
        if args.part in ("ray", "all"):
            _ray_parts(args, Path(work))


def _archviz(args: argparse.Namespace, work: Path) -> None:
    """(a): the local four-seed ArchViz sweep against the diffusers script."""
    params = {**({} if args.real else TINY), "style": args.style, "steps": args.steps, "width": args.width,
              "height": args.height}
    options = {"device": args.device, "dtype": args.dtype}
    warm = {**params, "steps": 1}
    _sweep(work / "warm-sweep", warm, options, SEEDS[:1])
    _script(work / "warm-script", warm, options, SEEDS[:1])
    ours, result = _timed(_sweep, work / "sweep", params, options, SEEDS)
    theirs, pictures = _timed(_script, work / "script", params, options, SEEDS)
    identical = all(_pixels(work / "sweep" / record.files[0]).tobytes() == picture.tobytes()
                    for record, picture in zip(result.jobs, pictures, strict=True))
    models = "hub models" if args.real else "tiny models"
    print(f"ArchViz, {len(SEEDS)} seeds, {models}, {args.width}x{args.height}, {args.steps} steps, {options}")
    print(f"graphflow sweep {ours:.3f} s   diffusers script {theirs:.3f} s   ratio {ours / theirs:.3f}   "
          f"images identical: {identical}")
    for record in result.jobs:
        print(f"  job {record.job.index} (seeds={record.job.params['seeds']}): ran {', '.join(record.ran)}; "
              f"{len(record.cached)} from cache; {record.seconds:.3f} s")


CANNY = ROOT / "graphs" / "controlnet_canny.json"
TRIVIAL = {"graphflow": 1, "params": {"a": {"type": "INT", "default": 0}}, "nodes": {
    "a": {"type": "Int", "inputs": {"value": {"param": "a"}}},
    "b": {"type": "Math", "inputs": {"a": {"from": "a.value"}, "b": 2, "op": "mul"}}}, "outputs": {"b": "b.result"}}


def _ray_parts(args: argparse.Namespace, work: Path) -> None:
    """(b) 1 vs 2 actors on an 8-job sweep; (c) the per-job overhead of the Ray backend on a trivial graph."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from graphflow import Engine
    from graphflow.batches import Batch
    from graphflow.models import ModelManager
    from graphflow.ray_backend import RayBackend
    from graphflow.sweep_runner import run_sweep

    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             num_cpus=2)
    fixed = {**({} if args.real else {"checkpoint": "tiny:sd15", "controlnet": "tiny:controlnet-canny"}),
             "steps": args.steps, "width": args.width, "height": args.height}
    timings = {}
    for actors in (1, 2):
        backend = RayBackend(actors=actors, threads=1, engine=Engine(input_dirs=[ROOT]),
                             options={"device": args.device, "dtype": args.dtype})
        run_sweep(CANNY, Batch(groups=({"seed": list(range(100, 100 + 2 * actors))},), fixed=fixed),
                  work / f"warm-{actors}", backend=backend)  # every actor loads its models and caches shared nodes
        assert all(backend.model_loads()), "an actor got no warm-up job"
        timings[actors], result = _timed(run_sweep, CANNY, Batch(groups=({"seed": list(range(8))},), fixed=fixed),
                                         work / f"ray-{actors}", backend=backend)
        ran = sorted({node for record in result.jobs for node in record.ran})
        backend.close()
    print(f"(b) 8-job sweep, {args.width}x{args.height}, {args.steps} steps, one torch thread per actor: "
          f"1 actor {timings[1]:.3f} s   2 actors {timings[2]:.3f} s   speed-up {timings[1] / timings[2]:.2f}"
          f"   (each job ran {', '.join(ran)})")
    trivial = work / "trivial.json"
    trivial.write_text(json.dumps(TRIVIAL))
    jobs = Batch(groups=({"a": list(range(100))},))
    warm = Batch(groups=({"a": [1000]},))
    local = Engine(models=ModelManager())
    run_sweep(trivial, warm, work / "trivial-warm-local", engine=local)
    local_s, _ = _timed(run_sweep, trivial, jobs, work / "trivial-local", engine=local)
    backend = RayBackend(actors=1, threads=1)
    run_sweep(trivial, warm, work / "trivial-warm-ray", backend=backend)
    ray_s, _ = _timed(run_sweep, trivial, jobs, work / "trivial-ray", backend=backend)
    backend.close()
    ray.shutdown()
    print(f"(c) trivial graph, 100 jobs: local {local_s * 10:.2f} ms/job   Ray (1 actor) {ray_s * 10:.2f} ms/job   "
          f"overhead {(ray_s - local_s) * 10:.2f} ms/job")


def _timed(function: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return time.perf_counter() - started, value


def _sweep(out: Path, params: dict[str, Any], options: dict[str, Any], seeds: tuple[int, ...]) -> Any:
    from graphflow import Engine
    from graphflow.batches import Batch
    from graphflow.models import ModelManager
    from graphflow.sweep_runner import run_sweep

    engine = Engine(input_dirs=[ROOT], output_dir=out, options=options, models=ModelManager())
    return run_sweep(GRAPH, Batch(groups=({"seeds": [[seed] for seed in seeds]},), fixed=params), out, engine=engine)


def _script(out: Path, params: dict[str, Any], options: dict[str, Any], seeds: tuple[int, ...]) -> list[Any]:
    """The guide's ArchViz code: one pipeline, control images made once, one call per seed, each saved."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from diffusers.utils import logging
    from PIL import Image

    from graphflow import Engine
    from graphflow.models import ModelManager, resolve_device, resolve_dtype, torch_dtype
    from nodes.imaging import to_uint8

    logging.disable_progress_bar()
    defaults = {name: spec.get("default") for name, spec in json.loads(GRAPH.read_text())["params"].items()}
    values = {**defaults, **params}
    maps = Engine(input_dirs=[ROOT], output_dir=out, options=options, models=ModelManager()).run(
        TEMPLATE, params, outputs=["edges", "depth", "prompt"]).outputs
    device = resolve_device(options["device"])
    dtype = torch_dtype(resolve_dtype(options["dtype"], device))
    controlnets = [ControlNetModel.from_pretrained(_source(values[name]), torch_dtype=dtype)
                   for name in ("canny_controlnet", "depth_controlnet")]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        _source(values["checkpoint"]), controlnet=controlnets, torch_dtype=dtype, safety_checker=None,
        requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    control = [Image.fromarray(to_uint8(maps[name])[0]) for name in ("edges", "depth")]
    out.mkdir(parents=True, exist_ok=True)
    pictures = []
    for seed in seeds:
        image = pipe(maps["prompt"], image=control, controlnet_conditioning_scale=[values["edges_scale"],
                                                                                  values["depth_scale"]],
                     num_inference_steps=values["steps"], guidance_scale=values["cfg"], width=values["width"],
                     height=values["height"], generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        image.save(out / f"archviz_{seed}.png")
        pictures.append(_pixels(out / f"archviz_{seed}.png"))
    return pictures


def _source(value: str) -> str:
    """A model source as diffusers names it: tiny:NAME is the folder graphflow made it in."""
    if value.startswith("tiny:"):
        return str(Path(os.environ["GRAPHFLOW_TINY_MODELS"]) / value.removeprefix("tiny:"))
    return value


def _pixels(path: Path) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


if __name__ == "__main__":
    main()
