"""Attacks on the memory option swap_controlnets: runs in threads sharing ControlNets with reversed windows and
different UNets, one ControlNet twice in a control list, schedulers with more calls than steps, img2img's truncated
schedule, a cancel and an error between or inside steps, and the command line's --swap-controlnets."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from graphflow import Cancelled, CancelToken, Engine, Graph, NodeExecutionError, save_document
from graphflow.cli import main
from graphflow.events import NodeProgress
from graphflow.models import ModelManager
from graphflow.models.manager import module_bytes
from nodes import SaveImage
from tests.nodes.sampling_graphs import Control, make_engine, sampling_graph, write_test_images

TIMEOUT = 240  # seconds a thread may take before the run counts as deadlocked
CANNY_FIRST = (Control("controlnet-canny", "edges.png", 1.0, 0.0, 0.5), Control("controlnet-depth", "depth.png", 0.8,
                                                                                0.5, 1.0))
DEPTH_FIRST = (Control("controlnet-depth", "depth.png", 0.8, 0.0, 0.5), Control("controlnet-canny", "edges.png", 1.0,
                                                                                0.5, 1.0))
SWAP = {"swap_controlnets": True}


def controlnets(models: ModelManager) -> dict[str, str]:
    """Each loaded ControlNet by folder name: 'device' when on its device as the budget counts, else 'off'."""
    on_device = set(models.on_device())
    return {Path(key.source).name.split("@")[0]: "device" if key in on_device else "off" for key in models.loaded()
            if key.kind == "controlnet"}


def nothing_held(models: ModelManager) -> bool:
    return all(models.holders(key) == 0 for key in models.loaded())


def pixels(engine: Engine, graph: Graph, **options: Any) -> torch.Tensor:
    return engine.run(graph, options=options).outputs["image"]


def fresh(tiny_models: Path, folder: Path) -> Engine:
    folder.mkdir(parents=True, exist_ok=True)
    return make_engine(tiny_models, folder)


# -- threads -----------------------------------------------------------------------------------------------------------

def test_runs_in_threads_sharing_controlnets_with_reversed_windows_neither_deadlock_nor_change_pixels(
        tiny_models: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models" / "sd15-copy"
    shutil.copytree(tiny_models / "sd15", copy)
    jobs = [(checkpoint, controls, options) for checkpoint in ("sd15", str(copy))
            for controls in (CANNY_FIRST, DEPTH_FIRST) for options in (SWAP, {})]
    # swapping is not keyed (the same pixels): other seeds keep the runs with and without it from sharing a result
    graphs = [sampling_graph(tiny_models, checkpoint, controls, steps=4, scheduler="euler", seed=11 if options else 12)
              for checkpoint, controls, options in jobs]
    reference = Engine(input_dirs=[write_test_images(_folder(tmp_path / "reference")), tiny_models, copy.parent],
                       output_dir=tmp_path / "reference-out", models=ModelManager())
    expected = [pixels(reference, graph) for graph in graphs]
    engine = Engine(input_dirs=[write_test_images(_folder(tmp_path / "in")), tiny_models, copy.parent],
                    output_dir=tmp_path / "out", models=ModelManager())
    together = threading.Barrier(2, timeout=TIMEOUT)  # the two UNets' first runs overlap for sure
    results: dict[int, Any] = {}

    def work(index: int) -> None:
        def meet(event: object) -> None:
            if index in (0, 4) and isinstance(event, NodeProgress) and event.node == "sampler" and event.step == 1:
                together.wait()

        try:
            results[index] = pixels_with_events(engine, graphs[index], jobs[index][2], meet)
        except BaseException as error:  # reported below, with the job it came from
            results[index] = error

    threads = [threading.Thread(target=work, args=(index,), daemon=True) for index in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a run is still waiting: deadlock"
    for index, image in results.items():
        assert isinstance(image, torch.Tensor), (jobs[index], image)
        assert torch.equal(image, expected[index]), jobs[index]
    assert len(results) == len(jobs) and nothing_held(engine.models)


def test_threads_swapping_under_a_budget_that_fits_one_controlnet_give_the_sequential_pixels(
        tiny_models: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models" / "sd15-copy"
    shutil.copytree(tiny_models / "sd15", copy)
    jobs = [("sd15", CANNY_FIRST), (str(copy), DEPTH_FIRST), ("sd15", DEPTH_FIRST), (str(copy), CANNY_FIRST)]
    graphs = [sampling_graph(tiny_models, checkpoint, controls, steps=4, scheduler="euler") for checkpoint, controls
              in jobs]
    roots = [tiny_models, copy.parent]
    reference = Engine(input_dirs=[write_test_images(_folder(tmp_path / "reference")), *roots],
                       output_dir=tmp_path / "reference-out", models=ModelManager())
    expected = [pixels(reference, graph) for graph in graphs]
    from diffusers import ControlNetModel

    controlnet = module_bytes(ControlNetModel.from_pretrained(tiny_models / "controlnet-canny"))
    models = ModelManager()
    # every model of both checkpoints and one ControlNet: idle ones are evicted (on the CPU: dropped) as threads go
    models.budget_bytes = reference.models.device_bytes - controlnet
    engine = Engine(input_dirs=[write_test_images(_folder(tmp_path / "in")), *roots], output_dir=tmp_path / "out",
                    models=models, options=SWAP)
    results: dict[int, Any] = {}

    def work(index: int) -> None:
        try:
            results[index] = pixels(engine, graphs[index])
        except BaseException as error:  # reported below, with the job it came from
            results[index] = error

    threads = [threading.Thread(target=work, args=(index,), daemon=True) for index in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a run is still waiting: deadlock"
    for index, image in results.items():
        assert isinstance(image, torch.Tensor) and torch.equal(image, expected[index]), (jobs[index], image)
    assert nothing_held(models)


def pixels_with_events(engine: Engine, graph: Graph, options: dict[str, Any], on_event: Any) -> torch.Tensor:
    return engine.run(graph, options=options, on_event=on_event).outputs["image"]


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


# -- windows against the schedule --------------------------------------------------------------------------------------

def test_one_controlnet_twice_in_a_control_list_with_other_windows_keeps_the_pixels(tiny_models: Path,
                                                                                    tmp_path: Path) -> None:
    twice = (Control("controlnet-canny", "edges.png", 1.0, 0.0, 0.3), Control("controlnet-canny", "depth.png", 0.5,
                                                                               0.2, 1.0))
    graph = sampling_graph(tiny_models, controls=twice, steps=10, scheduler="euler")
    expected = pixels(fresh(tiny_models, tmp_path / "all"), graph)
    engine = fresh(tiny_models, tmp_path / "swap")
    seen: list[tuple[int, dict[str, str]]] = []

    def watch(event: object) -> None:
        if isinstance(event, NodeProgress) and event.node == "sampler":
            seen.append((engine.models.holders(_key(engine.models)), controlnets(engine.models)))

    assert torch.equal(engine.run(graph, options=SWAP, on_event=watch).outputs["image"], expected)
    # the windows overlap at step 3: one use holds it until then, the other from then on, so it never leaves the
    # device until the last step (progress comes after each step's calls: the overlap is over by then)
    assert [held for held, _ in seen] == [1] * 9 + [0]
    assert all(state == {"controlnet-canny": "device"} for _, state in seen[:-1])
    assert seen[-1][1] == {"controlnet-canny": "off"} and nothing_held(engine.models)


def test_one_controlnet_in_two_adjacent_windows_is_placed_on_the_device_once(tiny_models: Path,
                                                                               tmp_path: Path) -> None:
    adjacent = (Control("controlnet-canny", "edges.png", 1.0, 0.0, 0.5), Control("controlnet-canny", "depth.png", 0.5,
                                                                                  0.5, 1.0))
    graph = sampling_graph(tiny_models, controls=adjacent, steps=4, scheduler="euler")
    engine = fresh(tiny_models, tmp_path / "swap")
    expected = pixels(fresh(tiny_models, tmp_path / "all"), graph)
    assert torch.equal(pixels(engine, graph, **SWAP), expected)
    assert engine.models.placements[_key(engine.models)] == 1


def _key(models: ModelManager) -> Any:
    [key] = [key for key in models.loaded() if key.kind == "controlnet"] or [None]
    return key


@pytest.mark.parametrize("scheduler", ["heun", "pndm", "default"])
def test_schedulers_with_other_call_counts_keep_the_pixels_and_place_each_controlnet_once(
        tiny_models: Path, tmp_path: Path, scheduler: str, monkeypatch: pytest.MonkeyPatch) -> None:
    graph = sampling_graph(tiny_models, controls=CANNY_FIRST, steps=4, scheduler=scheduler)
    expected = pixels(fresh(tiny_models, tmp_path / "all"), graph)
    engine = fresh(tiny_models, tmp_path / "swap")
    steps: list[tuple[int, dict[str, str]]] = []
    # the placements after each denoiser call: the loop ends each call with ctx.progress when a step finished
    # (progress counts steps, not calls: Heun makes two a step, PNDM one more) or else with ctx.check_cancelled
    from graphflow.context import RunContext

    progress, check = RunContext.progress, RunContext.check_cancelled

    def after_progress(ctx: RunContext, step: int, total: int) -> None:
        if ctx.node == "sampler":
            steps.append((step, controlnets(engine.models)))
        progress(ctx, step, total)

    def after_check(ctx: RunContext) -> None:
        if ctx.node == "sampler":
            steps.append((-1, controlnets(engine.models)))
        check(ctx)

    monkeypatch.setattr(RunContext, "progress", after_progress)
    monkeypatch.setattr(RunContext, "check_cancelled", after_check)
    assert torch.equal(engine.run(graph, options=SWAP).outputs["image"], expected)
    monkeypatch.undo()
    calls = len(steps)
    canny = [state.get("controlnet-canny") for _, state in steps]
    depth = [state.get("controlnet-depth") for _, state in steps]
    # the windows are fractions of the calls (heun: 2n-1 of them), as in the pipelines' controlnet_keep
    last_canny = max(index for index in range(calls) if (index + 1) / calls <= 0.5)
    assert canny[:last_canny] == ["device"] * last_canny and canny[last_canny] == "off"
    assert depth[:last_canny + 1] == [None] * (last_canny + 1) and depth[-2] == "device" and depth[-1] == "off"
    assert all(engine.models.placements[key] == 1 for key in engine.models.loaded() if key.kind == "controlnet")
    assert nothing_held(engine.models)


def test_img2img_windows_count_against_the_truncated_schedule(tiny_models: Path, tmp_path: Path) -> None:
    windows = (Control("controlnet-canny", "edges.png", 1.0, 0.0, 0.4), Control("controlnet-depth", "depth.png", 0.8,
                                                                                 0.4, 1.0))
    graph = sampling_graph(tiny_models, controls=windows, init_image="init.png", strength=0.5, steps=10,
                           scheduler="euler")  # five of the ten steps run: canny guides the first two
    expected = pixels(fresh(tiny_models, tmp_path / "all"), graph)
    engine = fresh(tiny_models, tmp_path / "swap")
    seen: list[dict[str, str]] = []

    def watch(event: object) -> None:
        if isinstance(event, NodeProgress) and event.node == "sampler":
            seen.append(controlnets(engine.models))

    assert torch.equal(engine.run(graph, options=SWAP, on_event=watch).outputs["image"], expected)
    assert seen == [{"controlnet-canny": "device"}, {"controlnet-canny": "off"},
                    {"controlnet-canny": "off", "controlnet-depth": "device"},
                    {"controlnet-canny": "off", "controlnet-depth": "device"},
                    {"controlnet-canny": "off", "controlnet-depth": "off"}]


def test_a_list_of_seeds_with_swapping_keeps_each_seeds_pixels(tiny_models: Path, tmp_path: Path) -> None:
    graph = sampling_graph(tiny_models, controls=CANNY_FIRST, steps=4, scheduler="euler", seed=[3, 5])
    expected = pixels(fresh(tiny_models, tmp_path / "all"), graph)
    engine = fresh(tiny_models, tmp_path / "swap")
    assert torch.equal(pixels(engine, graph, **SWAP), expected) and nothing_held(engine.models)
    assert controlnets(engine.models) == {"controlnet-canny": "off", "controlnet-depth": "off"}


# -- cancels and errors ------------------------------------------------------------------------------------------------

def test_a_cancel_between_steps_lets_go_of_the_held_controlnet(tiny_models: Path, tmp_path: Path) -> None:
    graph = sampling_graph(tiny_models, controls=CANNY_FIRST, steps=6, scheduler="euler")
    engine = fresh(tiny_models, tmp_path / "swap")
    token = CancelToken()
    held_when_cancelled: list[dict[str, str]] = []

    def cancel_at_step_two(event: object) -> None:
        if isinstance(event, NodeProgress) and event.node == "sampler" and event.step == 2:
            held_when_cancelled.append(controlnets(engine.models))
            token.cancel()

    with pytest.raises(Cancelled):
        engine.run(graph, options=SWAP, on_event=cancel_at_step_two, cancel=token)
    assert held_when_cancelled == [{"controlnet-canny": "device"}]
    assert nothing_held(engine.models) and controlnets(engine.models) == {"controlnet-canny": "off"}
    again = engine.run(graph, options=SWAP)
    assert "sampler" in again.ran
    assert torch.equal(again.outputs["image"], pixels(fresh(tiny_models, tmp_path / "all"), graph))


def test_an_error_inside_a_controlnet_call_lets_go_and_leaves_the_module_as_it_was(
        tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import ControlNetModel

    graph = sampling_graph(tiny_models, controls=CANNY_FIRST, steps=4, scheduler="euler")
    expected = pixels(fresh(tiny_models, tmp_path / "all"), graph, attention_slicing="max")
    engine = fresh(tiny_models, tmp_path / "swap")
    original, calls = ControlNetModel.forward, [0]

    def failing(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("out of memory (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ControlNetModel, "forward", failing)
    with pytest.raises(NodeExecutionError) as caught:
        engine.run(graph, options={**SWAP, "attention_slicing": "max"})
    assert caught.value.node == "sampler" and "simulated" in str(caught.value)
    assert nothing_held(engine.models) and set(controlnets(engine.models).values()) == {"off"}
    monkeypatch.setattr(ControlNetModel, "forward", original)
    assert torch.equal(pixels(engine, graph, **SWAP, attention_slicing="max"), expected)


# -- the command line --------------------------------------------------------------------------------------------------

def test_swap_controlnets_on_the_command_line_gives_the_same_files(tiny_models: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import nodes.controlnets

    images = write_test_images(_folder(tmp_path / "in"))
    graph = sampling_graph(tiny_models, controls=CANNY_FIRST, steps=4, scheduler="euler")
    graph.add(SaveImage(image=graph["decode"].image, prefix="render"), "save")
    path = images / "graph.json"
    save_document(graph.to_document(), path)
    windows: list[object] = []
    holder = nodes.controlnets._WindowHeld
    monkeypatch.setattr(nodes.controlnets, "_WindowHeld", lambda *args: windows.append(args) or holder(*args))
    common = ["run", str(path), "--input-dir", str(images), "--input-dir", str(tiny_models), "--quiet"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0 and windows == []
    assert main([*common, "--out", str(tmp_path / "swap"), "--swap-controlnets"]) == 0
    assert len(windows) == 2  # one per ControlNet: the option reached the Sampler
    [plain], [swapped] = (sorted((tmp_path / name).glob("render_*.png")) for name in ("plain", "swap"))
    assert np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(swapped)))
