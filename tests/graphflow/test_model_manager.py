"""The model manager loads each model once, keeps device memory within a budget, and never evicts a held model."""

from __future__ import annotations

import shutil

import pytest
import torch

from graphflow.models import ModelKey, ModelManager, resolve_dtype
from graphflow.models.manager import module_bytes


def _linear(features: int = 64) -> torch.nn.Module:
    return torch.nn.Linear(features, features)


def _key(name: str) -> ModelKey:
    return ModelKey("unet", name, dtype="fp32", device="cpu")


def test_a_model_is_loaded_once_however_often_it_is_used() -> None:
    manager = ModelManager()
    calls = []
    handle = manager.handle(_key("a"), lambda: calls.append(1) or _linear())
    assert calls == []  # registering loads nothing
    with handle.use() as first, handle.use() as second:
        assert first is second
    with manager.handle(_key("a"), _linear).use() as again:
        assert again is first
    assert calls == [1]
    assert manager.loads[_key("a")] == 1


def test_loaded_models_are_in_eval_mode() -> None:
    with ModelManager().handle(_key("a"), _linear).use() as model:
        assert not model.training


def test_the_least_recently_used_idle_model_is_dropped_to_stay_within_the_budget() -> None:
    size = module_bytes(_linear())
    manager = ModelManager(budget_bytes=2 * size)
    handles = {name: manager.handle(_key(name), _linear) for name in "abc"}
    for name in "ab":
        with handles[name].use():
            pass
    with handles["a"].use():  # a is now more recently used than b
        pass
    with handles["c"].use():
        pass
    assert set(manager.loaded()) == {_key("a"), _key("c")}
    assert manager.device_bytes <= 2 * size
    with handles["b"].use():  # b loads again when needed
        pass
    assert manager.loads[_key("b")] == 2


def test_a_model_a_running_node_holds_is_never_evicted() -> None:
    size = module_bytes(_linear())
    manager = ModelManager(budget_bytes=size)
    held = manager.handle(_key("held"), _linear)
    other = manager.handle(_key("other"), _linear)
    with held.use() as model:
        with other.use():
            assert _key("held") in manager.loaded()
        assert model.weight.shape == (64, 64)
    assert manager.loads[_key("held")] == 1


def test_unknown_offload_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="offload"):
        ModelManager(offload="sometimes")


def test_auto_dtype_is_fp16_on_gpus_and_fp32_on_the_cpu() -> None:
    assert resolve_dtype("auto", "cpu") == "fp32"
    assert resolve_dtype("auto", "cuda") == "fp16"
    assert resolve_dtype("bf16", "cuda") == "bf16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_offload_moves_weights_to_the_gpu_only_while_held() -> None:
    manager = ModelManager(offload="model")
    handle = manager.handle(ModelKey("unet", "a", dtype="fp16", device="cuda"), lambda: _linear().half())
    with handle.use() as model:
        assert model.weight.device.type == "cuda"
    assert model.weight.device.type == "cpu"


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on the CPU needs a C compiler")
def test_compile_runs_unets_through_torch_compile_with_the_same_results() -> None:
    manager = ModelManager(compile=True)
    plain = _linear(8)
    inputs = torch.randn(2, 8)
    with manager.handle(_key("compiled"), lambda: plain).use() as model:
        assert model._compiled_call_impl is not None  # nn.Module.compile() swaps the call in place
        assert torch.allclose(model(inputs), torch.nn.functional.linear(inputs, plain.weight, plain.bias))
    with manager.handle(ModelKey("vae", "v"), lambda: _linear(8)).use() as vae:
        assert vae._compiled_call_impl is None  # only UNets and ControlNets are compiled


class _GpuLinear(torch.nn.Linear):
    """A Linear that records where it is moved instead of moving, standing in for a model on a GPU."""

    device = "cpu"

    def to(self, device: str) -> _GpuLinear:  # type: ignore[override]
        self.device = str(device)
        return self


def test_memory_cached_by_pytorch_counts_as_free_so_one_eviction_is_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    gib = 1 << 30
    allocated = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gib // 2, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 4 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["bytes"])
    manager = ModelManager(reserve_bytes=gib)
    models = {name: _GpuLinear(64, 64) for name in "ab"}
    handles = {name: manager.handle(ModelKey("unet", name, device="cuda"), lambda n=name: models[n])
               for name in "ab"}
    with handles["a"].use():
        allocated["bytes"] = gib  # a takes 1 GiB of the 4 PyTorch holds; 3 GiB stay cached, free for b
    with handles["b"].use():
        pass
    assert models["a"].device == models["b"].device == "cuda"  # a was not offloaded to make room for b


def test_clear_forgets_idle_models_but_not_held_ones_and_handles_load_again() -> None:
    manager = ModelManager()
    idle, held = manager.handle(_key("idle"), _linear), manager.handle(_key("held"), _linear)
    with idle.use():
        pass
    with held.use():
        manager.clear()
        assert manager.loaded() == [_key("held")]
    with idle.use():
        pass
    assert manager.loads[_key("idle")] == 2
