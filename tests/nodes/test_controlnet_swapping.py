"""Memory option swap_controlnets: with guidance windows, only the ControlNets whose window covers the current step
are held on the device. One whose window has not begun is not loaded yet, one whose window has ended leaves the
device; the pixels are those of the run that holds them all."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from graphflow import Engine
from graphflow.events import NodeProgress
from graphflow.models import ModelManager
from graphflow.models.manager import module_bytes
from tests.nodes.sampling_graphs import Control, make_engine, sampling_graph

# ten steps of Euler: canny guides 0-2, depth 3-6, pose 7-9 (diffusers' keep rule: i/n >= start and (i+1)/n <= end)
WINDOWS = (Control("controlnet-canny", "edges.png", 1.0, 0.0, 0.3),
           Control("controlnet-depth", "depth.png", 0.8, 0.3, 0.7),
           Control("controlnet-pose", "pose.png", 0.6, 0.7, 1.0))
STEPS = 10


def _engine(tiny_models: Path, folder: Path, **options: object) -> Engine:
    folder.mkdir()
    return make_engine(tiny_models, folder, **({"options": options} if options else {}))


def _graph(tiny_models: Path):
    return sampling_graph(tiny_models, controls=WINDOWS, steps=STEPS, scheduler="euler")  # one call per step


def _controlnets(manager: ModelManager) -> dict[str, str]:
    """Each loaded ControlNet by its folder name: 'device' when on its device (as the budget counts), else 'off'."""
    on_device = set(manager.on_device())
    return {Path(key.source).name.split("@")[0]: "device" if key in on_device else "off" for key in manager.loaded()
            if key.kind == "controlnet"}


def _budget(tiny_models: Path, engine: Engine) -> int:
    """Room for the checkpoint's models and one ControlNet (they are all of a size)."""
    engine.run(sampling_graph(tiny_models, controls=WINDOWS[:1], steps=1))
    models = engine.models
    with_one = models.device_bytes
    models.clear()
    return with_one


def test_only_the_controlnets_of_the_current_step_are_on_the_device(tiny_models: Path, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    reference = _engine(tiny_models, tmp_path / "all").run(_graph(tiny_models)).outputs["image"]
    engine = _engine(tiny_models, tmp_path / "swap", swap_controlnets=True)
    budget = _budget(tiny_models, _engine(tiny_models, tmp_path / "measure"))
    engine.models.budget_bytes = budget
    seen: list[dict[str, str]] = []
    peak = [0]

    def watch(event: object) -> None:
        if isinstance(event, NodeProgress) and event.node == "sampler":
            seen.append(_controlnets(engine.models))
            peak[0] = max(peak[0], engine.models.device_bytes)

    with caplog.at_level(logging.WARNING, logger="graphflow.models.manager"):
        image = engine.run(_graph(tiny_models), on_event=watch).outputs["image"]
    assert torch.equal(image, reference)
    # after steps 1-3 only canny was loaded; depth came at step 4 and canny left; pose only from step 8
    assert seen[0] == seen[1] == {"controlnet-canny": "device"}
    assert seen[2] == {"controlnet-canny": "off"}
    assert seen[3] == seen[5] == {"controlnet-canny": "off", "controlnet-depth": "device"}
    assert seen[6] == {"controlnet-canny": "off", "controlnet-depth": "off"}
    assert seen[7] == seen[8] == {"controlnet-canny": "off", "controlnet-depth": "off", "controlnet-pose": "device"}
    assert peak[0] <= budget and "does not fit" not in caplog.text
    controlnets = [key for key in engine.models.loaded() if key.kind == "controlnet"]
    assert all(engine.models.loads[key] == 1 and engine.models.placements[key] == 1 for key in controlnets)


def test_without_swapping_the_same_budget_overflows(tiny_models: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    engine = _engine(tiny_models, tmp_path / "all")
    engine.models.budget_bytes = _budget(tiny_models, _engine(tiny_models, tmp_path / "measure"))
    with caplog.at_level(logging.WARNING, logger="graphflow.models.manager"):
        engine.run(_graph(tiny_models))
    assert "does not fit" in caplog.text  # all three ControlNets held at once


def test_a_controlnet_with_no_step_in_its_window_is_never_loaded(tiny_models: Path, tmp_path: Path) -> None:
    engine = _engine(tiny_models, tmp_path / "swap", swap_controlnets=True)
    silent = (WINDOWS[0], Control("controlnet-depth", "depth.png", 0.0))  # scale 0 guides no step
    reference = _engine(tiny_models, tmp_path / "one").run(
        sampling_graph(tiny_models, controls=WINDOWS[:1], steps=STEPS)).outputs["image"]
    image = engine.run(sampling_graph(tiny_models, controls=silent, steps=STEPS)).outputs["image"]
    assert torch.equal(image, reference)
    assert _controlnets(engine.models) == {"controlnet-canny": "off"}


COMPILED = {"compile": "default", "compile_backend": "eager", "compile_components": ["controlnet"]}


@pytest.mark.parametrize("extra", [{"attention_slicing": "max"}, {"guess_mode": True}, COMPILED],
                         ids=["attention_slicing", "guess_mode", "compiled"])
def test_swapping_keeps_the_pixels_with_other_options(tiny_models: Path, tmp_path: Path, extra: dict) -> None:
    run_options = {"attention_slicing", *COMPILED}
    options = {name: value for name, value in extra.items() if name in run_options}
    sampler = {name: value for name, value in extra.items() if name not in run_options}
    graph = sampling_graph(tiny_models, controls=WINDOWS, steps=4, **sampler)
    reference = _engine(tiny_models, tmp_path / "all", **options).run(graph).outputs["image"]
    swapped = _engine(tiny_models, tmp_path / "swap", **options, swap_controlnets=True).run(graph)
    assert torch.equal(swapped.outputs["image"], reference)


def test_module_bytes_of_the_budget_are_the_controlnets(tiny_models: Path) -> None:
    from diffusers import ControlNetModel

    sizes = {module_bytes(ControlNetModel.from_pretrained(tiny_models / c.model)) for c in WINDOWS}
    assert len(sizes) == 1  # the budget above fits any one of them
