"""Attacks on one Engine and one ModelManager under threads with the tiny SD1.5 / SDXL / ControlNet models: pixels
against sequential runs, a tiny memory cache, a small model budget, shared tokenizers and single-file checkpoints
(test_attack_disk_shared.py shares a disk cache directory between Engines in threads and another process)."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from graphflow import Cancelled, CancelToken, Engine
from graphflow.events import NodeProgress
from graphflow.models import ModelManager

ROOT = Path(__file__).resolve().parents[2]
GRAPHS = ROOT / "graphs"
SD = {"checkpoint": "tiny:sd15", "controlnet": "tiny:controlnet-canny", "steps": 2}
SHUFFLED = {  # ContentShuffle as the control image; a Canny overlay template
    "graphflow": 1, "name": "attack-shuffle",
    "nodes": {
        "photo": {"type": "LoadImage", "inputs": {"path": "graphs/assets/room.png"}},
        "region": {"type": "LoadMask", "inputs": {"path": "graphs/assets/room_mask.png"}},
        "shuffle": {"type": "ContentShuffle", "inputs": {"image": {"from": "photo.image"}, "detect_resolution": 64,
                                                         "image_resolution": 64, "granularity": 16, "seed": 3}},
        "overlay": {"template": str(GRAPHS / "templates" / "edge_overlay.json"),  # a template used as a node
                    "inputs": {"image": {"from": "photo.image"}, "mask": {"from": "region.mask"}, "low": 40,
                               "high": 120, "feather": 3}},
        "sd": {"type": "CheckpointLoader", "inputs": {"model": "tiny:sd15"}},
        "cn": {"type": "ControlNetLoader", "inputs": {"model": "tiny:controlnet-canny"}},
        "pos": {"type": "TextEncode", "inputs": {"clip": {"from": "sd.clip"}, "text": "a shuffled room"}},
        "ctl": {"type": "ControlApply", "inputs": {"controlnet": {"from": "cn.controlnet"},
                                                   "image": {"from": "shuffle.image"}, "scale": 0.7}},
        "sample": {"type": "Sampler", "inputs": {"model": {"from": "sd.model"},
                                                 "positive": {"from": "pos.conditioning"},
                                                 "control": [{"from": "ctl.control"}], "seed": 5, "steps": 2,
                                                 "width": 64, "height": 64}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": {"from": "sd.vae"}, "latent": {"from": "sample.latent"}}},
    },
    "outputs": {"image": "decode.image", "overlay": "overlay.image", "shuffle": "shuffle.image"},
}
JOBS: list[tuple[Any, dict[str, Any]]] = [
    (GRAPHS / "controlnet_canny.json", {**SD, "seed": 0, "width": 64, "height": 48, "prefix": "a"}),
    (GRAPHS / "controlnet_canny.json", {**SD, "seed": 1, "scale": 0.4, "width": 64, "height": 48, "prefix": "b"}),
    (GRAPHS / "inpaint.json", {**SD, "checkpoint": "tiny:sd15-inpaint", "feather": 2}),
    (GRAPHS / "img2img_style.json", {**SD, "strength": 0.5}),
    (GRAPHS / "sdxl_canny.json", {"checkpoint": "tiny:sdxl", "controlnet": "tiny:controlnet-sdxl",
                                  "vae": "tiny:sdxl-vae", "width": 64, "height": 64, "steps": 2}),
    (SHUFFLED, {}),
]
TIMEOUT = 120.0


@pytest.fixture(autouse=True)
def tiny_sources(tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHFLOW_TINY_MODELS", str(tiny_models))


@pytest.fixture(scope="module")
def expected(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, torch.Tensor]]:
    """Every job run once, in order, on an Engine and a ModelManager of its own."""
    os.environ["GRAPHFLOW_TINY_MODELS"] = str(tiny_models)  # module scope: monkeypatch is per test
    engine = Engine(input_dirs=[ROOT], output_dir=tmp_path_factory.mktemp("sequential"), models=ModelManager())
    return [engine.run(graph, params).outputs for graph, params in JOBS]


def threaded(engine: Engine, repeat: int = 2, workers: int = 6) -> list[tuple[int, Any]]:
    order = [index for index in range(len(JOBS)) for _ in range(repeat)]
    random.Random(7).shuffle(order)
    with ThreadPoolExecutor(workers) as pool:
        futures = [(index, pool.submit(engine.run, *JOBS[index])) for index in order]
        return [(index, future.result(timeout=TIMEOUT)) for index, future in futures]


def assert_same(results: list[tuple[int, Any]], expected: list[dict[str, torch.Tensor]]) -> None:
    for index, result in results:
        assert not set(result.ran) & set(result.cached) and len(set(result.ran)) == len(result.ran)
        assert len(set(result.cached)) == len(result.cached) and set(result.timings) == set(result.ran)
        for name, value in expected[index].items():
            assert torch.equal(result.outputs[name], value), (JOBS[index][0], name)


@pytest.mark.parametrize("setup", ["plain", "tiny-cache-small-budget-offload", "small-budget"])
def test_threads_running_real_graphs_on_one_engine_give_the_sequential_pixels(
        setup: str, expected: list[dict[str, torch.Tensor]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if setup == "plain":
        models, cache_bytes = ModelManager(), 2 << 30
    elif setup == "small-budget":  # on the CPU device, idle models are dropped and loaded again on their next use
        models, cache_bytes = ModelManager(budget_bytes=400_000), 2 << 30
    else:
        models, cache_bytes = ModelManager(budget_bytes=400_000, offload="model"), 20_000
    engine = Engine(input_dirs=[ROOT], output_dir=tmp_path / "out", models=models, cache_bytes=cache_bytes)
    results = threaded(engine)
    assert_same(results, expected)
    assert engine._flights == {}
    assert engine.cache.bytes <= cache_bytes
    if setup == "plain":
        assert set(models.loads.values()) == {1}  # every model loaded once for all threads
        assert all(models.holders(key) == 0 for key in models.loaded())


def test_a_sampler_cancelled_from_another_thread_hands_over_to_the_run_waiting_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(input_dirs=[ROOT], output_dir=tmp_path / "out", models=ModelManager())
    graph, params = JOBS[0][0], {**JOBS[0][1], "steps": 12}
    engine.run(graph, {**params, "steps": 1})  # everything but the sampler and what follows is cached now
    token, stepping = CancelToken(), threading.Event()
    outcome: dict[str, Any] = {}

    def cancelled() -> None:
        try:
            engine.run(graph, params, cancel=token,
                       on_event=lambda event: isinstance(event, NodeProgress) and event.step >= 2 and stepping.set())
        except Cancelled as error:
            outcome["a"] = error

    first = threading.Thread(target=cancelled)
    first.start()
    assert stepping.wait(TIMEOUT)
    second = threading.Thread(target=lambda: outcome.setdefault("b", engine.run(graph, params)))
    second.start()
    deadline = time.monotonic() + TIMEOUT
    while not any(flight.signal for flight in list(engine._flights.values())):  # the second waits for the first
        assert time.monotonic() < deadline and first.is_alive()
        time.sleep(0.005)
    threading.Thread(target=token.cancel).start()
    first.join(TIMEOUT)
    second.join(TIMEOUT)
    assert not first.is_alive() and not second.is_alive()
    assert isinstance(outcome["a"], Cancelled)
    reference = Engine(input_dirs=[ROOT], output_dir=tmp_path / "reference", models=engine.models)
    assert torch.equal(outcome["b"].outputs["image"], reference.run(graph, params).outputs["image"])
    assert "sample" in outcome["b"].ran and engine._flights == {}
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["a_00000.png", "a_00001.png"]  # none
    # from the cancelled run: the 1-step warm-up's and the second run's
    assert engine.run(graph, params).ran == []


def test_threads_encoding_prompts_at_once_all_get_77_token_embeddings() -> None:
    engine = Engine(models=ModelManager())

    def graph(index: int) -> dict[str, Any]:
        return {"graphflow": 1, "nodes": {
            "sd": {"type": "CheckpointLoader", "inputs": {"model": "tiny:sd15"}},
            "pos": {"type": "TextEncode", "inputs": {"clip": {"from": "sd.clip"},
                                                     "text": f"prompt {index} " * (1 + index % 4)}}},
            "outputs": {"c": "pos.conditioning"}}

    engine.run(graph(-1))
    shapes: Counter[tuple[int, ...]] = Counter()
    deadline = time.monotonic() + 10.0
    batch = 0
    while time.monotonic() < deadline and set(shapes) <= {(1, 77, 32)}:
        with ThreadPoolExecutor(8) as pool:
            shapes.update(pool.map(lambda index: tuple(engine.run(graph(index)).outputs["c"].embeds.shape),
                                   range(batch, batch + 200)))
        batch += 200
    assert set(shapes) == {(1, 77, 32)}, shapes


def test_a_single_file_checkpoint_two_engines_load_at_once_is_converted_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import diffusers
    from safetensors.torch import save_file

    converted: list[str] = []

    def from_single_file(path: str, **_: object) -> SimpleNamespace:  # diffusers' conversion needs the hub
        converted.append(path)
        time.sleep(0.3)
        part = SimpleNamespace(config={"in_channels": 4, "scaling_factor": 0.18215})
        return SimpleNamespace(unet=part, vae=part, text_encoder=part, tokenizer=object(), scheduler=part)

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_single_file", staticmethod(from_single_file))
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.full((2, 4, 1, 1), 0.25)},
              tmp_path / "attack_single.safetensors")
    models = ModelManager()
    engines = [Engine(input_dirs=[tmp_path], models=models) for _ in range(2)]
    graph = {"graphflow": 1, "nodes": {"sd": {"type": "CheckpointLoader",
                                              "inputs": {"model": "attack_single.safetensors"}}},
             "outputs": {"m": "sd.model"}}
    with ThreadPoolExecutor(2) as pool:
        handles = list(pool.map(lambda engine: engine.run(graph).outputs["m"].unet, engines))
    assert handles[0] is handles[1]
    assert len(converted) == 1
