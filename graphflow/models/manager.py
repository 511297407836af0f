"""Load each model once per (source, dtype, device), share it, and keep device memory within a budget.

Nodes never hold raw weights in the result cache: loader nodes output handles, and a node that
needs the weights holds them only inside `with handle.use() as model:`. While any node holds a
model it is never evicted; between uses the least recently used models leave the device first
(moved to the CPU when the device is a GPU, dropped when it is the CPU) once the budget is full.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "model", "sequential")
COMPILED_KINDS = frozenset({"unet", "controlnet"})


@dataclass(frozen=True)
class ModelKey:
    """What identifies one loaded model: kind, where it comes from, precision and device."""

    kind: str
    source: str
    subfolder: str = ""
    dtype: str = "fp32"
    device: str = "cpu"

    def __str__(self) -> str:
        where = f"{self.source}/{self.subfolder}" if self.subfolder else self.source
        return f"{self.kind} {where} ({self.dtype}, {self.device})"


@dataclass(eq=False)
class ModelHandle:
    """A model the manager can load on demand; the value MODEL, CLIP, VAE and CONTROLNET outputs carry."""

    key: ModelKey
    manager: ModelManager = field(repr=False)
    load: Callable[[], Any] = field(repr=False)
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    def use(self) -> Any:
        """`with handle.use() as model:` — the model on its device, held (never evicted) inside the block."""
        return self.manager.use(self)


@dataclass(eq=False)
class _Entry:
    model: Any
    bytes: int
    on_device: bool = False
    holders: int = 0
    streamed: bool = False  # sequential offload: accelerate moves each layer in and out by itself


def module_bytes(model: Any) -> int:
    """Bytes of a torch module's parameters and buffers (0 for anything else)."""
    if not hasattr(model, "parameters"):
        return 0
    tensors = [*model.parameters(), *model.buffers()]
    return sum(tensor.element_size() * tensor.nelement() for tensor in tensors)


class ModelManager:
    """Loads models once and places them on their device, keeping `budget_bytes` (when set) on it.

    `offload`: `none` keeps models on the device; `model` moves each to the device only while a
    node holds it; `sequential` streams weights layer by layer from the CPU (accelerate), for GPUs
    too small for one model. `compile` runs UNets and ControlNets through `torch.compile`.
    Without a budget on a GPU, models are evicted when free GPU memory would drop below
    `reserve_bytes`.
    """

    def __init__(self, budget_bytes: int | None = None, *, offload: str = "none", compile: bool = False,
                 reserve_bytes: int = 1 << 30) -> None:
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"unknown offload mode '{offload}'; expected one of {', '.join(OFFLOAD_MODES)}")
        self.budget_bytes = budget_bytes
        self.offload = offload
        self.compile = compile
        self.reserve_bytes = reserve_bytes
        self.loads: Counter[ModelKey] = Counter()
        self._handles: dict[ModelKey, ModelHandle] = {}
        self._entries: OrderedDict[ModelKey, _Entry] = OrderedDict()
        self._lock = threading.RLock()

    def handle(self, key: ModelKey, load: Callable[[], Any], config: dict[str, Any] | None = None) -> ModelHandle:
        """The one handle for `key`; `load()` returns the model on the CPU in the key's dtype, and runs
        at the first `use`, not here."""
        with self._lock:
            existing = self._handles.get(key)
            if existing is None:
                existing = self._handles[key] = ModelHandle(key, self, load, dict(config or {}))
            return existing

    @contextmanager
    def use(self, handle: ModelHandle) -> Iterator[Any]:
        with self._lock:
            entry = self._entries.get(handle.key) or self._load(handle)
            self._entries.move_to_end(handle.key)
            entry.holders += 1
        try:
            with self._lock:
                self._place(handle.key, entry)
            yield entry.model
        finally:
            with self._lock:
                entry.holders -= 1
                if self.offload == "model" and entry.holders == 0 and entry.on_device:
                    entry.model.to("cpu")
                    entry.on_device = False

    @property
    def device_bytes(self) -> int:
        """Bytes of the models now on their devices (counting CPU-device models as on device)."""
        return sum(entry.bytes for entry in self._entries.values() if entry.on_device)

    def loaded(self) -> list[ModelKey]:
        return list(self._entries)

    def clear(self) -> None:
        """Forget every loaded model (handles stay valid and load again on their next use)."""
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.holders == 0:
                    del self._entries[key]

    def _load(self, handle: ModelHandle) -> _Entry:
        log.info("loading %s", handle.key)
        model = handle.load()
        self.loads[handle.key] += 1
        if hasattr(model, "eval"):
            model.eval()  # gradients stay as loaded: nodes run under no_grad, and freezing fp16 weights
            # would change which CPU kernels run, and so the pixels, against a stock diffusers pipeline
        entry = _Entry(model, module_bytes(model))
        if self.compile and handle.key.kind in COMPILED_KINDS and hasattr(model, "compile"):
            model.compile()
        if self.offload == "sequential" and handle.key.device != "cpu" and hasattr(model, "parameters"):
            from accelerate import cpu_offload

            cpu_offload(model, execution_device=handle.key.device)
            entry.streamed = True
        self._entries[handle.key] = entry
        return entry

    def _place(self, key: ModelKey, entry: _Entry) -> None:
        if entry.on_device or entry.streamed:
            return
        self._make_room(key, entry.bytes)
        if key.device != "cpu" and hasattr(entry.model, "to"):
            entry.model.to(key.device)
        entry.on_device = True

    def _make_room(self, key: ModelKey, needed: int) -> None:
        """Evict least recently used models nobody holds until `needed` more bytes fit on `key.device`."""
        for other, entry in list(self._entries.items()):
            if not self._short_of(key.device, needed):
                return
            if other == key or entry.holders or not entry.on_device or entry.streamed or other.device != key.device:
                continue
            if other.device == "cpu":
                log.info("unloading %s to stay within the memory budget", other)
                del self._entries[other]
            else:
                log.info("offloading %s to the CPU to make room on %s", other, other.device)
                entry.model.to("cpu")
                entry.on_device = False
        if self._short_of(key.device, needed):
            log.warning("%s does not fit in the model memory budget even after evicting every idle model; "
                        "loading it anyway (try --offload model)", key)

    def _short_of(self, device: str, needed: int) -> bool:
        if self.budget_bytes is not None:
            used = sum(entry.bytes for key, entry in self._entries.items() if entry.on_device and key.device == device)
            return used + needed > self.budget_bytes
        if device.startswith("cuda"):
            import torch

            cuda = torch.device(device)
            free, _ = torch.cuda.mem_get_info(cuda)
            # memory PyTorch has cached but not allocated is free for the next model too, and it is where an
            # offloaded model's memory goes: without it every eviction would look useless and evict the rest
            cached = torch.cuda.memory_reserved(cuda) - torch.cuda.memory_allocated(cuda)
            return free + cached - needed < self.reserve_bytes
        return False


_shared: ModelManager | None = None


def shared_manager() -> ModelManager:
    """The process-wide manager Engines use unless given their own, so every run shares loaded models."""
    global _shared
    if _shared is None:
        _shared = ModelManager()
    return _shared
