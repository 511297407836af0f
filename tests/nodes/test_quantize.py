"""Loaders quantise the UNet, text encoders and ControlNets (torchao, quanto; bitsandbytes on CUDA only): the manager
counts the quantised bytes, a render stays close to fp32 without being equal, and the setting keys models and results.

Measured here with the tiny SD1.5 + Canny ControlNet (64 px, 3 steps): int8 leaves 70-72 % of the fp32 bytes (the
convolutions stay fp32) and moves pixels by at most ~0.004 (torchao) / ~0.002 (quanto) on a 0..1 scale; fp8 ~0.02.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from graphflow import Engine, Graph
from graphflow.errors import NodeExecutionError
from graphflow.models.manager import ModelHandle, module_bytes
from graphflow.models.quantization import installed
from nodes import CheckpointLoader, ControlNetLoader
from tests.nodes.sampling_graphs import make_engine, sampling_graph

EXTRA = "needs the graphflow[quantize] extra"
LOADERS = ("CheckpointLoader", "ControlNetLoader")


def needs(backend: str, *values: Any) -> Any:
    """A parameter set (backend, *values) that skips when the backend's package is not installed."""
    module = {"torchao": "torchao", "quanto": "optimum.quanto"}[backend]
    return pytest.param(backend, *values, marks=pytest.mark.skipif(not installed(backend),
                                                                   reason=f"{EXTRA} ({module})"))


@pytest.fixture(scope="module")
def engine(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return make_engine(tiny_models, tmp_path_factory.mktemp("quantize"))


def quantized(graph: Graph, mode: str, backend: str = "auto") -> dict[str, Any]:
    """The graph's document with every CheckpointLoader and ControlNetLoader quantising as asked."""
    document = graph.to_document()
    for node in document["nodes"].values():
        if node["type"] in LOADERS:
            node["inputs"].update(quantize=mode, quantize_backend=backend)
    return document


def loaders_graph(tiny_models: Path) -> Graph:
    graph = Graph("loaders")
    sd = graph.add(CheckpointLoader(model=str(tiny_models / "sd15")), "sd")
    graph.output("model", sd.model)
    graph.output("clip", sd.clip)
    graph.output("vae", sd.vae)
    graph.output("controlnet", graph.add(ControlNetLoader(model=str(tiny_models / "controlnet-canny"))).controlnet)
    return graph


def part_handles(outputs: dict[str, Any]) -> dict[str, ModelHandle]:
    """The handles of the parts `loaders_graph` outputs, by kind."""
    return {"unet": outputs["model"].unet, "text_encoder": outputs["clip"].encoders[0],
            "vae": outputs["vae"].vae, "controlnet": outputs["controlnet"].controlnet}


def counted_bytes(engine: Engine, document: dict[str, Any]) -> tuple[dict[str, int], dict[str, str]]:
    """The bytes the model manager counts for each loaded part, and the quantization its key names, by kind."""
    handles = part_handles(engine.run(document).outputs)
    counted = {}
    for kind, handle in handles.items():
        with handle.use() as module:
            counted[kind] = module_bytes(module)
    return counted, {kind: handle.key.quantization for kind, handle in handles.items()}


@pytest.mark.parametrize("backend", [needs("torchao"), needs("quanto")])
def test_int8_weights_take_about_three_quarters_of_the_fp32_bytes(backend: str, engine: Engine,
                                                                  tiny_models: Path) -> None:
    graph = loaders_graph(tiny_models)
    full, _ = counted_bytes(engine, quantized(graph, "none"))
    int8, keys = counted_bytes(engine, quantized(graph, "int8", backend))
    assert keys == {"unet": f"int8 ({backend})", "text_encoder": f"int8 ({backend})", "vae": "",
                    "controlnet": f"int8 ({backend})"}
    ratios = {kind: int8[kind] / full[kind] for kind in full}
    print(f"\nint8 ({backend}) / fp32 bytes: " + ", ".join(f"{kind} {ratio:.3f}" for kind, ratio in ratios.items()))
    assert ratios["vae"] == 1.0  # not quantised: the same module as the fp32 loader's
    for kind in ("unet", "text_encoder", "controlnet"):
        assert 0.6 < ratios[kind] < 0.8, f"{kind}: {ratios[kind]:.3f} of the fp32 bytes"


def test_the_manager_counts_the_stored_bytes_of_quantised_tensors_not_their_logical_dtype() -> None:
    pytest.importorskip("torchao", reason=EXTRA)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = torch.nn.Linear(64, 64)
    quantize_(layer, Int8WeightOnlyConfig())
    assert layer.weight.element_size() == 4  # the tensor subclass reports the dtype it stands for
    # int8 data, one fp32 scale and one int8 zero point per output row, the fp32 bias
    assert module_bytes(layer) == 64 * 64 + 64 * (4 + 1) + 64 * 4


@pytest.mark.parametrize(("backend", "mode", "largest"), [
    needs("torchao", "int8", 0.02), needs("quanto", "int8", 0.02), needs("torchao", "fp8", 0.06),
])
def test_a_quantised_render_is_close_to_fp32_but_not_equal(backend: str, mode: str, largest: float, engine: Engine,
                                                           tiny_models: Path) -> None:
    graph = sampling_graph(tiny_models)
    full = engine.run(quantized(graph, "none")).outputs["image"]
    ours = engine.run(quantized(graph, mode, backend)).outputs["image"]
    difference = (ours - full).abs()
    relative = float(difference.norm() / full.norm())
    print(f"\n{mode} ({backend}) vs fp32: max abs {float(difference.max()):.4g}, relative {relative:.3g}")
    assert not torch.equal(ours, full)
    assert float(difference.max()) < largest
    assert relative < 0.01


def test_two_loaders_with_other_quantize_settings_never_share_a_model(tiny_models: Path, tmp_path: Path) -> None:
    pytest.importorskip("torchao", reason=EXTRA)
    engine = make_engine(tiny_models, tmp_path)
    graph = Graph("two")
    graph.output("full", graph.add(ControlNetLoader(model=str(tiny_models / "controlnet-canny"))).controlnet)
    graph.output("int8", graph.add(ControlNetLoader(model=str(tiny_models / "controlnet-canny"), quantize="int8",
                                                    quantize_backend="torchao")).controlnet)
    outputs = engine.run(graph).outputs
    full, int8 = outputs["full"].controlnet, outputs["int8"].controlnet
    assert full.key != int8.key and int8.key.quantization == "int8 (torchao)"
    with full.use() as full_module, int8.use() as int8_module:
        assert full_module is not int8_module
        assert type(int8_module.controlnet_cond_embedding.conv_in.weight) is torch.nn.Parameter  # convs stay fp32
    assert "int8 (torchao)" in str(int8.key)


def test_quantize_reruns_the_loaders_and_what_follows_and_none_is_the_default(tiny_models: Path,
                                                                              tmp_path: Path) -> None:
    pytest.importorskip("torchao", reason=EXTRA)
    engine = make_engine(tiny_models, tmp_path)
    graph = sampling_graph(tiny_models)
    engine.run(graph)
    assert engine.run(quantized(graph, "none")).ran == []
    loaded = set(engine.models.loaded())
    engine.run(quantized(graph, "none", "quanto"))  # another literal: the loaders re-run, but give the same models
    assert set(engine.models.loaded()) == loaded
    ran = set(engine.run(quantized(graph, "int8", "torchao")).ran)
    assert ran == {"sd", "positive", "control_net_loader", "control_apply", "sampler", "decode"}
    assert len(engine.models.loaded()) == len(loaded) + 3  # the UNet, text encoder and ControlNet, not the VAE


def test_bitsandbytes_on_the_cpu_is_refused_naming_torchao_and_quanto(engine: Engine, tiny_models: Path) -> None:
    graph = quantized(sampling_graph(tiny_models), "int8", "bitsandbytes")
    with pytest.raises(NodeExecutionError, match="bitsandbytes, which needs a CUDA GPU") as raised:
        engine.run(graph, options={"device": "cpu"})
    message = str(raised.value)
    assert "torchao" in message and "quanto" in message and "graphflow[quantize]" in message
    assert raised.value.node == "sd"


def test_nf4_on_the_cpu_points_to_int4_with_quanto(engine: Engine, tiny_models: Path) -> None:
    with pytest.raises(NodeExecutionError, match="int4 with quantize_backend quanto"):
        engine.run(quantized(sampling_graph(tiny_models), "nf4"), options={"device": "cpu"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes needs a CUDA GPU")
def test_bitsandbytes_int8_on_cuda_shrinks_the_unet(tiny_models: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (CUDA only)")
    engine = make_engine(tiny_models, tmp_path, options={"device": "cuda", "dtype": "fp16"})
    graph = loaders_graph(tiny_models)
    outputs = {mode: engine.run(quantized(graph, mode, "bitsandbytes" if mode != "none" else "auto")).outputs
               for mode in ("none", "int8")}
    sizes = {}
    for mode, values in outputs.items():
        with values["model"].unet.use() as unet:
            sizes[mode] = module_bytes(unet)
    assert sizes["int8"] < 0.8 * sizes["none"]


def test_a_single_file_checkpoint_asked_to_quantise_says_to_convert_it_to_a_folder(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from graphflow.models import ModelManager

    pytest.importorskip("torchao", reason=EXTRA)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, tmp_path / "sd.safetensors")
    document = {"graphflow": 1, "nodes": {"sd": {"type": "CheckpointLoader", "inputs": {
        "model": "sd.safetensors", "quantize": "int8"}}}, "outputs": {"model": "sd.model"}}
    with pytest.raises(NodeExecutionError, match=r"single-file checkpoint.*save_pretrained"):
        Engine(input_dirs=[tmp_path], models=ModelManager()).run(document)
