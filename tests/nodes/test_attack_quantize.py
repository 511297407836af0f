"""Attacks on quantised loading: int8 and fp32 of one source never share a loaded model or a cached result (in memory,
on disk, or when two threads load both at once); quantize="none" keys as if unset whatever the backend says; the
manager counts what quantised tensors store; settings that cannot work here name what would."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from graphflow import Engine
from graphflow.models import ModelManager
from graphflow.models.manager import module_bytes
from graphflow.models.quantization import QuantizationError, installed, quantization
from tests.nodes.sampling_graphs import make_engine, sampling_graph
from tests.nodes.test_quantize import loaders_graph, part_handles, quantized

pytest.importorskip("torchao", reason="needs the graphflow[quantize] extra (torchao)")


def engine_in(tiny_models: Path, folder: Path) -> Engine:
    folder.mkdir()
    return make_engine(tiny_models, folder)


def is_quantised(module: torch.nn.Module) -> bool:
    """Whether the module's linear weights are torchao or quanto tensors rather than plain parameters."""
    linears = [layer for layer in module.modules() if isinstance(layer, torch.nn.Linear)]
    return bool(linears) and all(type(layer.weight) is not torch.nn.Parameter for layer in linears)


def test_two_threads_loading_int8_and_fp32_of_one_source_at_once_each_get_their_own(tiny_models: Path,
                                                                                    tmp_path: Path) -> None:
    engine = make_engine(tiny_models, tmp_path)
    graph = loaders_graph(tiny_models)
    documents = {"none": quantized(graph, "none"), "int8": quantized(graph, "int8", "torchao")}
    start = threading.Barrier(len(documents))
    loaded: dict[str, dict[str, bool]] = {}
    failures: list[BaseException] = []

    def load(mode: str) -> None:
        try:
            start.wait()
            found = {}
            for kind, handle in part_handles(engine.run(documents[mode]).outputs).items():
                with handle.use() as module:
                    found[kind] = is_quantised(module)
            loaded[mode] = found
        except BaseException as error:  # reported below, in the test's own thread
            failures.append(error)

    threads = [threading.Thread(target=load, args=(mode,)) for mode in documents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures
    assert loaded["none"] == {"unet": False, "text_encoder": False, "controlnet": False, "vae": False}
    assert loaded["int8"] == {"unet": True, "text_encoder": True, "controlnet": True, "vae": False}
    assert len(engine.models.loaded()) == 7  # 4 fp32 parts, 3 quantised ones; the VAE is shared


def test_an_int8_load_leaves_no_quantisation_behind_for_the_next_fp32_load(tiny_models: Path, tmp_path: Path) -> None:
    graph = loaders_graph(tiny_models)
    engine_in(tiny_models, tmp_path / "first").run(quantized(graph, "int8", "torchao"))
    outputs = engine_in(tiny_models, tmp_path / "second").run(quantized(graph, "none")).outputs
    with outputs["model"].unet.use() as unet:
        assert not any(is_quantised(layer) for layer in unet.modules() if isinstance(layer, torch.nn.Linear))


def test_none_with_any_backend_renders_with_the_unset_models(tiny_models: Path, tmp_path: Path) -> None:
    engine = make_engine(tiny_models, tmp_path)
    graph = sampling_graph(tiny_models)
    unset = engine.run(graph)
    assert engine.run(quantized(graph, "none")).ran == []  # the default literal keys as if unset
    loaded = engine.models.loaded()
    for backend in ("torchao", "quanto", "bitsandbytes"):  # no backend is asked to do anything for none
        # another literal is another node key (the engine keys inputs as written), so this re-renders: same pixels
        again = engine.run(quantized(graph, "none", backend))
        assert torch.equal(again.outputs["image"], unset.outputs["image"])
    assert engine.models.loaded() == loaded and {key.quantization for key in loaded} == {""}


def test_a_disk_cache_never_serves_a_quantised_render_for_fp32_or_the_other_way(tiny_models: Path,
                                                                                tmp_path: Path) -> None:
    graph = sampling_graph(tiny_models)
    cache = tmp_path / "cache"

    def fresh(name: str) -> Engine:  # another process, as far as caching goes: its own memory, the same disk cache
        engine = engine_in(tiny_models, tmp_path / name)
        return Engine(input_dirs=list(engine.paths.input_roots), output_dir=tmp_path / name / "out",
                      disk_cache=cache, models=ModelManager())

    int8 = fresh("a").run(quantized(graph, "int8", "torchao"))
    full = fresh("b").run(quantized(graph, "none"))
    assert "sampler" in full.ran  # not the int8 render from disk
    assert torch.equal(full.outputs["image"], engine_in(tiny_models, tmp_path / "c").run(graph).outputs["image"])
    assert not torch.equal(full.outputs["image"], int8.outputs["image"])
    again = fresh("d").run(quantized(graph, "int8", "torchao"))
    assert "sampler" in again.cached and torch.equal(again.outputs["image"], int8.outputs["image"])
    quanto = fresh("e").run(quantized(graph, "int8", "quanto")) if installed("quanto") else None
    if quanto is not None:  # another backend is another model: not the torchao render
        assert "sampler" in quanto.ran


@pytest.mark.skipif(not installed("quanto"), reason="needs optimum-quanto")
@pytest.mark.parametrize(("mode", "stored"), [("int8", 64 * 64 + 64 * 4), ("int4", 64 * 64 // 2 + 64 * 4 * 2),
                                              ("fp8", 64 * 64 + 64 * 4)])
def test_the_manager_counts_what_quanto_tensors_store(mode: str, stored: int) -> None:
    from optimum.quanto import freeze, qfloat8, qint4, qint8
    from optimum.quanto import quantize as quanto_quantize

    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    quanto_quantize(model, weights={"int8": qint8, "int4": qint4, "fp8": qfloat8}[mode])
    freeze(model)
    bias, scales = 64 * 4, 2 * 4  # the fp32 bias; quanto's input and output scale buffers
    assert module_bytes(model) == stored + bias + scales


def test_the_manager_budgets_a_quantised_model_by_its_stored_bytes(tiny_models: Path, tmp_path: Path) -> None:
    engine = make_engine(tiny_models, tmp_path)
    handles = part_handles(engine.run(quantized(loaders_graph(tiny_models), "int8", "torchao")).outputs)
    stored = 0
    for handle in handles.values():
        with handle.use() as module:
            stored += module_bytes(module)
            logical = sum(tensor.element_size() * tensor.nelement() for tensor in module.parameters())
            assert module_bytes(module) < 0.8 * logical or handle.key.quantization == ""
    assert engine.models.device_bytes == stored


@pytest.mark.parametrize(("mode", "backend", "device", "message"), [
    ("int4", "torchao", "cpu", "int4 kernels need a CUDA GPU, but the device is cpu; set quantize_backend to quanto"),
    ("nf4", "auto", "cpu", "needs a CUDA GPU .* use int4 with quantize_backend quanto"),
    ("nf4", "quanto", "cpu", "quanto does not offer .* set quantize_backend to bitsandbytes"),
    ("fp8", "bitsandbytes", "cuda", "bitsandbytes does not offer .* set quantize_backend to torchao or quanto"),
    ("int8", "bitsandbytes", "cpu", "needs a CUDA GPU .* torchao or quanto"),
    ("INT8", "auto", "cpu", "quantize is 'INT8'; expected one of none, int8, int4, fp8, nf4"),
    ("int8", "onnx", "cpu", "quantize_backend is 'onnx'; expected one of auto, torchao, quanto, bitsandbytes"),
])
def test_settings_that_cannot_work_here_name_what_would(mode: str, backend: str, device: str, message: str) -> None:
    with pytest.raises(QuantizationError, match=message):
        quantization(mode, backend, device)


@pytest.mark.skipif(installed("bitsandbytes"), reason="bitsandbytes is installed here")
@pytest.mark.parametrize("backend", ["auto", "bitsandbytes"])
def test_nf4_on_a_gpu_without_bitsandbytes_says_how_to_install_it(backend: str) -> None:
    with pytest.raises(QuantizationError, match=r"bitsandbytes, which is not installed: pip install 'bitsandbytes"):
        quantization("nf4", backend, "cuda:0")


def test_int4_on_a_gpu_goes_to_torchao_and_on_the_cpu_to_quanto() -> None:
    assert quantization("int4", "auto", "cuda:1") == quantization("int4", "torchao", "cuda")
    if installed("quanto"):
        assert str(quantization("int4", "auto", "cpu")) == "int4 (quanto)"


def test_a_bad_setting_fails_in_its_loader_node_naming_it(tiny_models: Path, tmp_path: Path) -> None:
    from graphflow.errors import NodeExecutionError

    document: dict[str, Any] = quantized(loaders_graph(tiny_models), "int4", "torchao")
    with pytest.raises(NodeExecutionError) as raised:
        make_engine(tiny_models, tmp_path).run(document, options={"device": "cpu"})
    assert raised.value.node in {"sd", "control_net_loader"} and "quanto" in str(raised.value)
