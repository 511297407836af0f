"""torch.compile per run: the chosen components run compiled (wrappers sharing the shared modules' weights), give
eager's pixels within float noise, key exactly the loaders whose components change, and leave the shared modules
as they were.

The CPU tests compile with TorchDynamo's "eager" backend (graph capture without code generation: ~15 s for the
four tiny components here, where inductor needs minutes on 2 cores); the inductor modes run on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from graphflow import Engine
from graphflow.cli import _parser
from graphflow.cli_options import _compile_options
from graphflow.errors import NodeExecutionError
from graphflow.models import ModelManager
from graphflow.models.compilation import Compilation
from tests.nodes.sampling_graphs import make_engine, sampling_graph

EVERYTHING = ["unet", "controlnet", "vae", "text_encoder"]
TRACED = {"compile": "default", "compile_backend": "eager"}


@pytest.fixture(scope="module")
def engine(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return make_engine(tiny_models, tmp_path_factory.mktemp("compile"))


def captured() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def shared_modules(engine: Engine) -> dict[str, Any]:
    """The modules the engine's model manager holds, by kind, as every graph shares them between runs."""
    modules = {}
    for key in engine.models.loaded():
        with engine.models.handle(key, lambda: None).use() as module:
            modules[key.kind] = module
    return modules


def test_compiled_components_give_eager_pixels_and_leave_the_shared_modules_eager(engine: Engine,
                                                                                   tiny_models: Path) -> None:
    graph = sampling_graph(tiny_models)
    eager = engine.run(graph).outputs["image"]
    before = captured()
    compiled = engine.run(graph, options={**TRACED, "compile_components": EVERYTHING}).outputs["image"]
    assert captured() > before  # graphs were captured: the UNet, the ControlNet, the VAE's decode, the text encoder
    assert float((compiled - eager).abs().max()) < 1e-5
    for kind, module in shared_modules(engine).items():
        assert type(module).__name__ != "OptimizedModule", kind
        assert module._compiled_call_impl is None, f"the shared {kind} was compiled in place"
    assert torch.equal(engine.run(sampling_graph(tiny_models), options={"compile": None}).outputs["image"], eager)


def test_a_second_compiled_run_compiles_nothing_again(engine: Engine, tiny_models: Path) -> None:
    options = {**TRACED, "compile_components": EVERYTHING}
    engine.run(sampling_graph(tiny_models), options=options)
    before = captured()
    # new wrappers of the same modules (a new Sampler, TextEncode and VAEDecode run), the same mode: no new graph
    engine.run(sampling_graph(tiny_models, seed=11, negative="blurry"), options=options)
    assert captured() == before


def test_compile_options_rerun_exactly_the_loaders_whose_components_change(tiny_models: Path,
                                                                          tmp_path: Path) -> None:
    engine = make_engine(tiny_models, tmp_path)
    graph = sampling_graph(tiny_models)
    engine.run(graph)
    ran = {name: set(engine.run(graph, options=options).ran) for name, options in {
        "off as unset": {"compile": False, "compile_components": ["vae"]},
        "unet": {**TRACED, "compile_components": ["unet"]},
        "True is default": {"compile": True, "compile_backend": "eager", "compile_components": "unet"},
        "vae too": {**TRACED, "compile_components": ["vae", "unet"]},
        "the defaults: unet and controlnet": TRACED,
    }.items()}
    assert ran == {"off as unset": set(), "unet": {"sd", "positive", "sampler", "decode"}, "True is default": set(),
                   "vae too": {"sd", "positive", "sampler", "decode"},
                   # the checkpoint as in "unet" (cached since), the ControlNet compiled now
                   "the defaults: unet and controlnet": {"control_net_loader", "control_apply", "sampler", "decode"}}


def test_the_loaders_values_carry_the_engine_and_manager_defaults(tiny_models: Path, tmp_path: Path) -> None:
    from graphflow import Graph
    from nodes import CheckpointLoader

    graph = Graph("loader")
    sd = graph.add(CheckpointLoader(model=str(tiny_models / "sd15")))
    graph.output("model", sd.model)
    graph.output("vae", sd.vae)
    images = tmp_path / "in"
    images.mkdir()
    old_style = Engine(input_dirs=[images, tiny_models], models=ModelManager(compile=True))  # compile=True still works
    outputs = old_style.run(graph).outputs
    assert outputs["model"].compile == Compilation("default") and outputs["vae"].compile is None
    per_engine = Engine(input_dirs=[images, tiny_models], models=ModelManager(),
                        options={"compile": "max-autotune", "compile_components": ["vae"]})
    outputs = per_engine.run(graph).outputs
    assert outputs["model"].compile is None and outputs["vae"].compile == Compilation("max-autotune")
    outputs = per_engine.run(graph, options={"compile": "reduce-overhead"}).outputs  # per run, over the Engine's
    assert outputs["vae"].compile == Compilation("reduce-overhead")


@pytest.mark.parametrize(("options", "message"), [
    ({"compile": "fastest"}, "option compile is 'fastest'; expected true, false or a torch.compile mode"),
    ({"compile": True, "compile_components": ["unet", "scheduler"]}, "compile_components names 'scheduler'"),
    ({"compile": True, "compile_backend": ""}, "option compile_backend is ''"),
])
def test_bad_compile_options_fail_the_loader_that_uses_them(options: dict[str, Any], message: str, engine: Engine,
                                                            tiny_models: Path) -> None:
    with pytest.raises(NodeExecutionError, match=message):
        engine.run(sampling_graph(tiny_models, seed=5), options=options)


def test_the_cli_takes_a_compile_mode_and_components() -> None:
    def options(*argv: str) -> dict[str, Any]:
        return _compile_options(_parser().parse_args(["run", "g.json", *argv]))

    assert options() == {"compile": None, "compile_components": None}
    assert options("--compile") == {"compile": "default", "compile_components": None}
    assert options("--compile", "max-autotune", "--compile-components", "unet,vae") == {
        "compile": "max-autotune", "compile_components": ["unet", "vae"]}
    for wrong in (["--compile", "fastest"], ["--compile-components", "unet,scheduler"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(["run", "g.json", *wrong])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's GPU modes need a CUDA GPU")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune"])
def test_inductor_modes_on_cuda_stay_close_to_eager(mode: str, tiny_models: Path, tmp_path: Path) -> None:
    engine = make_engine(tiny_models, tmp_path, options={"device": "cuda", "dtype": "fp16"})
    graph = sampling_graph(tiny_models)
    eager = engine.run(graph).outputs["image"]
    compiled = engine.run(graph, options={"compile": mode}).outputs["image"]
    assert float((compiled - eager).abs().max()) < 0.02
