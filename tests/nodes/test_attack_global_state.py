"""Attacks on process-global state: nothing in graphflow/ or nodes/ may seed or draw from the global random generators,
switch torch's default dtype, change warning filters, logging levels, the environment or the working directory while
graphs run (in threads, with models loading meanwhile); checked by reading the code and by running it."""

from __future__ import annotations

import ast
import logging
import os
import random
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from graphflow import Engine
from graphflow.models import ModelManager

ROOT = Path(__file__).resolve().parents[2]
GRAPHS = ROOT / "graphs"
SD = {"checkpoint": "tiny:sd15", "controlnet": "tiny:controlnet-canny", "steps": 2, "width": 64, "height": 48}

# calls that change process-wide state, and the few places they are allowed (each checked by a test of its own)
GLOBAL_CALLS = frozenset({
    "torch.manual_seed", "torch.seed", "torch.set_rng_state", "torch.random.manual_seed", "np.random.seed",
    "numpy.random.seed", "random.seed", "torch.set_default_dtype", "torch.set_default_device",
    "torch.set_num_threads", "torch.use_deterministic_algorithms", "torch.set_float32_matmul_precision",
    "torch.set_grad_enabled", "warnings.filterwarnings", "warnings.simplefilter", "warnings.resetwarnings",
    "logging.disable", "logging.basicConfig", "os.chdir", "os.putenv", "os.environ.update", "os.environ.setdefault",
    "os.environ.pop", "os.environ.clear", "sys.setrecursionlimit", "random.random", "random.randint",
    "random.choice", "random.shuffle", "random.uniform",
    *(f"np.random.{name}" for name in ("rand", "randn", "randint", "random", "uniform", "normal", "choice",
                                       "shuffle", "permutation")),
})
ALLOWED = {
    # inside torch.random.fork_rng under the load lock, while writing tiny models (graphflow/models/tiny*.py)
    ("graphflow/models/tiny.py", "torch.manual_seed"), ("graphflow/models/tiny_depth.py", "torch.manual_seed"),
    # inside warnings.catch_warnings, once, while importing controlnet_aux; and the environment put back after it
    ("nodes/annotators.py", "warnings.simplefilter"), ("nodes/annotators.py", "os.environ.clear"),
    ("nodes/annotators.py", "os.environ.update"),
    # the Ray backend: torch's threads in an actor (a process of its own, one Engine); Ray's usage statistics off
    # (unless the user set them) just before this process starts or joins a Ray cluster
    ("graphflow/ray_actor.py", "torch.set_num_threads"), ("graphflow/ray_backend.py", "os.environ.setdefault"),
    # `graphflow run image.png` on the command line: inside warnings.catch_warnings, RerunWarnings shown each time
    ("graphflow/rerun.py", "warnings.simplefilter"),
}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return "?"


def global_calls(tree: ast.AST) -> set[str]:
    found = set()
    imports_random = any(alias.name == "random" and alias.asname is None for node in ast.walk(tree)
                         if isinstance(node, ast.Import) for alias in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            if name.startswith("random.") and not imports_random:
                continue  # a local generator named `random` (a RandomState), not the module
            if name in GLOBAL_CALLS or name.endswith((".setLevel", ".set_verbosity")):
                found.add(name)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            found.update("os.environ[...] =" for target in targets
                         if isinstance(target, ast.Subscript) and dotted(target.value) == "os.environ")
    return found


def test_no_module_of_the_engine_or_the_node_library_calls_process_global_setters() -> None:
    found = {(str(path.relative_to(ROOT)), call) for folder in ("graphflow", "nodes")
             for path in sorted((ROOT / folder).rglob("*.py")) for call in global_calls(ast.parse(path.read_text()))}
    assert found <= ALLOWED, sorted(found - ALLOWED)


def snapshot() -> dict[str, Any]:
    return {
        "torch rng": torch.random.get_rng_state().clone(), "numpy rng": np.random.get_state()[1].copy(),
        "python rng": random.getstate(), "default dtype": torch.get_default_dtype(),
        "warning filters": list(warnings.filters), "environment": dict(os.environ), "cwd": os.getcwd(),
        "torch threads": torch.get_num_threads(), "grad": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul precision": torch.get_float32_matmul_precision(),
        "logging": {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
                    if isinstance(logger, logging.Logger)} | {"": logging.root.level},
        "logging disabled": logging.root.manager.disable,
    }


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    changed = []
    for name, value in before.items():
        other = after[name]
        if isinstance(value, torch.Tensor | np.ndarray):
            same = bool((value == other).all()) and value.shape == other.shape
        elif name == "logging":  # loggers made meanwhile (at NOTSET) are not a change
            same = all(other.get(logger) == level for logger, level in value.items())
        else:
            same = value == other
        if not same:
            changed.append(name)
    return changed


def sampling_jobs() -> list[tuple[Path, dict[str, Any]]]:
    return [(GRAPHS / "controlnet_canny.json", {**SD, "seed": seed, "prefix": f"s{seed}"}) for seed in (0, 1)] + [
        (GRAPHS / "inpaint.json", {"checkpoint": "tiny:sd15-inpaint", "controlnet": "tiny:controlnet-canny", "steps": 2,
                                   "feather": 2})]


def test_runs_in_threads_while_fp16_models_load_change_no_global_state_and_keep_their_pixels(
        tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading in fp16 switches torch's default dtype for a while (transformers does); runs on other threads
    must neither see that nor leave anything global changed."""
    monkeypatch.setenv("GRAPHFLOW_TINY_MODELS", str(tiny_models))
    jobs = sampling_jobs()
    shuffle = {"graphflow": 1, "nodes": {
        "photo": {"type": "LoadImage", "inputs": {"path": "graphs/assets/room.png"}},
        "shuffle": {"type": "ContentShuffle", "inputs": {"image": {"from": "photo.image"}, "detect_resolution": 64,
                                                         "image_resolution": 64, "granularity": 16}},
        "lines": {"type": "LineartStandard", "inputs": {"image": {"from": "photo.image"}, "detect_resolution": 64}}},
        "outputs": {"shuffle": "shuffle.image", "lines": "lines.image"}}
    jobs.append((shuffle, {}))  # type: ignore[arg-type]
    reference = Engine(input_dirs=[ROOT], output_dir=tmp_path / "ref", models=ModelManager())
    expected = [reference.run(graph, params).outputs for graph, params in jobs]
    loading = {"graphflow": 1, "nodes": {
        "sd": {"type": "CheckpointLoader", "inputs": {"model": "tiny:sdxl"}},
        "pos": {"type": "TextEncode", "inputs": {"clip": {"from": "sd.clip"}, "text": "fp16 weights"}}},
        "outputs": {"c": "pos.conditioning"}}
    Engine(models=ModelManager(), options={"dtype": "fp16"}).run(loading)  # first imports, before the snapshot
    models = ModelManager()
    before = snapshot()
    stop = threading.Event()

    def keep_loading() -> int:
        loads = 0
        while not stop.is_set():  # a fresh manager each time: the text encoders load again, in fp16
            Engine(models=ModelManager(), options={"dtype": "fp16"}).run(loading)
            loads += 1
        return loads

    with ThreadPoolExecutor(4) as pool:
        loader = pool.submit(keep_loading)
        try:
            for _ in range(2):  # fresh Engines: every node runs again while the loads go on
                engine = Engine(input_dirs=[ROOT], output_dir=tmp_path / "out", models=models)
                results = [future.result(timeout=120).outputs for future in
                           [pool.submit(engine.run, *job) for job in jobs]]
                for got, wanted in zip(results, expected, strict=True):
                    assert all(torch.equal(got[name], wanted[name]) for name in wanted)
        finally:
            stop.set()
        assert loader.result(timeout=60) >= 1
    assert changes(before, snapshot()) == []


def test_the_first_annotator_run_leaves_the_environment_as_it_was(tmp_path: Path) -> None:
    pristine = {name: value for name, value in os.environ.items() if name != "KMP_DUPLICATE_LIB_OK"}  # an earlier
    # test's annotator run in this process may have set it here already
    script = (
        "import os, sys\n"
        "import cv2, diffusers, numpy, torch, transformers  # what every run imports anyway\n"
        "from graphflow import Engine\n"
        "before = dict(os.environ)\n"
        "graph = {'graphflow': 1, 'nodes': {'photo': {'type': 'LoadImage', 'inputs': {'path': sys.argv[2]}},\n"
        "         'lines': {'type': 'LineartStandard', 'inputs': {'image': {'from': 'photo.image'},\n"
        "                   'detect_resolution': 64}}}, 'outputs': {'lines': 'lines.image'}}\n"
        "Engine(input_dirs=[sys.argv[1]]).run(graph)\n"
        "after = dict(os.environ)\n"
        "print(sorted(name for name in after.keys() | before.keys() if after.get(name) != before.get(name)))\n")
    done = subprocess.run([sys.executable, "-c", script, str(ROOT), "graphs/assets/room.png"], capture_output=True,
                          text=True, timeout=120, check=False, env={**pristine, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
