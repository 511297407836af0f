"""The model manager loads each model once, keeps device memory within a budget, and never evicts a held model."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

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


def test_compile_true_is_the_engines_default_option_and_never_compiles_the_shared_model_in_place() -> None:
    from graphflow import Engine

    manager = ModelManager(compile=True)
    with manager.handle(_key("unet"), lambda: _linear(8)).use() as model:
        assert model._compiled_call_impl is None  # runs compile a wrapper of their own (graphflow.models.compilation)
    assert Engine(models=manager).models.compile is True


def test_the_manager_counts_the_bytes_quantised_weights_store() -> None:
    pytest.importorskip("optimum.quanto", reason="needs the graphflow[quantize] extra")
    from optimum.quanto import freeze, qint8, quantize

    model = torch.nn.Sequential(_linear(64))
    quantize(model, weights=qint8)  # quanto swaps the children for quantised ones
    freeze(model)
    assert model[0].weight.element_size() == 4  # the tensor subclass reports the fp32 it stands for
    manager = ModelManager()
    with manager.handle(_key("q"), lambda: model).use():
        pass
    # int8 data, one fp32 scale per output row, the fp32 bias, quanto's two fp32 activation scales (buffers)
    assert manager.device_bytes == module_bytes(model) == 64 * 64 + 64 * 4 + 64 * 4 + 2 * 4


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


def _in_threads(count: int, work: Callable[[int], object]) -> list[object]:
    """`work(index)` on `count` threads started together; each result, or the exception it raised."""
    start = threading.Barrier(count)
    results: list[object] = [None] * count

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = work(index)
        except Exception as error:  # collected, so the test can assert on every thread's outcome
            results[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    return results


def _one_at_a_time(spans: list[tuple[float, float]]) -> bool:
    """Whether no two (start, end) spans overlap."""
    return all(earlier[1] <= later[0] for earlier, later in itertools.pairwise(sorted(spans)))


def _slow(model: torch.nn.Module, seconds: float, calls: list[str], name: str = "") -> Callable[[], torch.nn.Module]:
    def load() -> torch.nn.Module:
        calls.append(name)
        time.sleep(seconds)
        return model

    return load


def test_a_model_eight_threads_ask_for_at_once_loads_once_and_is_shared() -> None:
    manager = ModelManager()
    calls: list[str] = []
    handle = manager.handle(_key("a"), _slow(_linear(), 0.2, calls))

    def use(_: int) -> torch.nn.Module:
        with handle.use() as model:
            return model

    models = _in_threads(8, use)

    assert calls == [""] and manager.loads[_key("a")] == 1
    assert all(model is models[0] for model in models) and isinstance(models[0], torch.nn.Linear)


def test_using_a_loaded_model_never_waits_for_another_models_load() -> None:
    manager = ModelManager()
    loaded = manager.handle(_key("loaded"), _linear)
    with loaded.use():
        pass
    slow = manager.handle(_key("slow"), _slow(_linear(), 1.0, []))
    loading = threading.Thread(target=lambda: slow.use().__enter__())
    loading.start()
    time.sleep(0.1)  # the slow load is under way

    began = time.perf_counter()
    with loaded.use() as model:
        assert isinstance(model, torch.nn.Linear)
    assert time.perf_counter() - began < 0.5 and loading.is_alive()
    loading.join()


def test_loads_take_turns_because_the_libraries_patch_process_globals() -> None:
    manager = ModelManager()
    spans: list[tuple[float, float]] = []

    def load() -> torch.nn.Module:
        began = time.perf_counter()
        time.sleep(0.05)
        spans.append((began, time.perf_counter()))
        return _linear()

    handles = [manager.handle(_key(f"m{index}"), load) for index in range(6)]

    def use(index: int) -> None:
        with handles[index].use():
            pass

    assert _in_threads(6, use) == [None] * 6
    assert _one_at_a_time(spans)


def test_loading_tiny_models_on_many_threads_leaves_no_library_patch_behind(tiny_models: Path) -> None:
    from graphflow import Engine

    document = {"graphflow": 1, "nodes": {
        "sd": {"type": "CheckpointLoader", "inputs": {"model": "sd15"}},
        "xl": {"type": "CheckpointLoader", "inputs": {"model": "sdxl"}},
        "cn": {"type": "ControlNetLoader", "inputs": {"model": "controlnet-canny"}},
    }, "outputs": {"sd": "sd.clip", "xl": "xl.clip", "unet": "sd.model", "vae": "xl.vae", "cn": "cn.controlnet"}}
    outputs = Engine(input_dirs=[tiny_models], models=ModelManager()).run(document).outputs
    handles = [*outputs["sd"].encoders, *outputs["xl"].encoders, outputs["unet"].unet, outputs["vae"].vae,
               outputs["cn"].controlnet]

    def use(index: int) -> set[str]:
        with handles[index].use() as module:
            return {parameter.device.type for parameter in module.parameters()}

    assert _in_threads(len(handles), use) == [{"cpu"}] * len(handles)
    # two builds at once could leave accelerate's empty-weights patch in place: every later module on "meta"
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"


def test_a_failed_load_reaches_every_waiter_and_a_later_use_retries() -> None:
    manager = ModelManager()
    calls: list[str] = []

    def load() -> torch.nn.Module:
        calls.append("load")
        time.sleep(0.2)
        if len(calls) == 1:
            raise OSError("disk went away")
        return _linear()

    handle = manager.handle(_key("a"), load)

    def use(_: int) -> object:
        with handle.use() as model:
            return model

    outcomes = _in_threads(8, use)

    assert calls == ["load"] and all(isinstance(outcome, OSError) for outcome in outcomes)
    assert manager.loaded() == [] and manager.loads[_key("a")] == 0
    with handle.use() as model:
        assert isinstance(model, torch.nn.Linear)
    assert calls == ["load", "load"] and manager.loads[_key("a")] == 1


def test_holders_are_counted_exactly_across_threads_and_a_held_model_is_never_evicted() -> None:
    size = module_bytes(_linear())
    manager = ModelManager(budget_bytes=size)  # room for one model: every other use evicts whatever is idle
    held = manager.handle(_key("held"), _slow(_linear(), 0.1, []))
    others = [manager.handle(_key(f"other{index}"), _linear) for index in range(4)]
    inside = threading.Barrier(8)
    counts: list[int] = []

    def work(index: int) -> None:
        with held.use() as model:
            inside.wait()  # all eight hold it now
            counts.append(manager.holders(_key("held")))
            for _ in range(5):
                with others[index % 4].use():
                    assert _key("held") in manager.loaded()
            assert model.weight.shape == (64, 64)
            inside.wait()

    outcomes = _in_threads(8, work)

    assert outcomes == [None] * 8 and counts == [8] * 8
    assert manager.holders(_key("held")) == 0 and manager.loads[_key("held")] == 1


def test_models_offloaded_between_uses_end_where_the_last_decision_put_them() -> None:
    manager = ModelManager(1 << 40, offload="model")  # a budget: no GPU memory to ask about
    model = _GpuLinear(8, 8)
    handle = manager.handle(ModelKey("unet", "a", device="cuda"), lambda: model)

    def use(_: int) -> str:
        with handle.use() as placed:
            return placed.device

    for _ in range(20):
        assert _in_threads(8, use) == ["cuda"] * 8  # on the device whenever someone holds it
        assert model.device == "cpu"  # and off it once nobody does


def test_tiny_model_weights_load_once_for_eight_threads(tiny_models: Path) -> None:
    from graphflow import Engine

    manager = ModelManager()
    document = {"graphflow": 1, "nodes": {"sd": {"type": "CheckpointLoader", "inputs": {"model": "sd15"}}},
                "outputs": {"model": "sd.model", "vae": "sd.vae"}}
    outputs = Engine(input_dirs=[tiny_models], models=manager).run(document).outputs
    handles = [outputs["model"].unet, outputs["vae"].vae]

    def use(index: int) -> torch.nn.Module:
        with handles[index % 2].use() as module:
            return module

    modules = _in_threads(8, use)

    assert sorted(key.kind for key in manager.loads) == ["unet", "vae"] and set(manager.loads.values()) == {1}
    assert len({id(module) for module in modules}) == 2


def test_quiet_progress_keeps_bars_off_while_any_thread_loads_and_restores_them_after() -> None:
    from transformers.utils import logging as transformers_logging

    from graphflow.models.loading import quiet_progress

    transformers_logging.enable_progress_bar()
    spans: list[tuple[float, float]] = []

    def load(_: int) -> bool:
        with quiet_progress():
            began = time.perf_counter()
            time.sleep(0.01)
            spans.append((began, time.perf_counter()))
            return transformers_logging.is_progress_bar_enabled()

    assert _in_threads(8, load) == [False] * 8 and transformers_logging.is_progress_bar_enabled()
    assert _one_at_a_time(spans)
