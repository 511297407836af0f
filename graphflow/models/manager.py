"""Load each model once per (source, dtype, device), share it, and keep device memory within a budget.

Nodes never hold raw weights in the result cache: loader nodes output handles, and a node that
needs the weights holds them only inside `with handle.use() as model:`. While any node holds a
model it is never evicted; between uses the least recently used models leave the device first
(moved to the CPU when the device is a GPU, dropped when it is the CPU) once the budget is full.

Safe under threads: a model several threads ask for at once loads once (the others wait for that
load and share its error, if any); using a loaded model never waits for another one's load, and
models move on and off their devices concurrently. Loads themselves take turns (`LOAD_LOCK`): the
libraries that build models are not safe to run twice at once in one process.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "model", "sequential")
# diffusers, transformers and accelerate patch process globals while they build a model (accelerate's empty-weights
# init swaps nn.Module.register_parameter; transformers swaps torch.nn.init's functions and the default dtype). Two
# builds at once can leave a patch in place for good: every module made afterwards lands on the meta device. So every
# load in the process, whichever manager runs it, holds this lock (graphflow.models.loading.quiet_progress does too).
LOAD_LOCK = threading.RLock()


@dataclass(frozen=True)
class ModelKey:
    """What identifies one loaded model: kind, where it comes from, precision, device and quantization."""

    kind: str
    source: str
    subfolder: str = ""
    dtype: str = "fp32"
    device: str = "cpu"
    quantization: str = ""  # e.g. "int8 (torchao)" (graphflow.models.quantization); "" for the weights as stored

    def __str__(self) -> str:
        where = f"{self.source}/{self.subfolder}" if self.subfolder else self.source
        quantized = f", {self.quantization}" if self.quantization else ""
        return f"{self.kind} {where} ({self.dtype}, {self.device}{quantized})"


@dataclass(eq=False)
class ModelHandle:
    """A model the manager can load on demand; the value MODEL, CLIP, VAE and CONTROLNET outputs carry."""

    key: ModelKey
    manager: ModelManager = field(repr=False)
    load: Callable[[], Any] = field(repr=False)
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    def use(self, *, offload_after: bool = False) -> Any:
        """`with handle.use() as model:` — the model on its device, held (never evicted) inside the block;
        `offload_after`: off the device when the block ends and no one else holds it."""
        return self.manager.use(self, offload_after=offload_after)

    @property
    def sources(self) -> tuple[Any, ...]:
        """The ModelSources the weights are read from (when its load checks them: graphflow.models.sources.verified)."""
        return getattr(self.load, "sources", ())


_USED: ContextVar[set[ModelHandle] | None] = ContextVar("graphflow_models_used", default=None)


class RecordingUses:
    """`with RecordingUses() as used:` adds to `used` every handle used inside the block in this thread (or task).
    A class, not a generator: the engine enters one per node it runs."""

    __slots__ = ("_token", "used")

    def __init__(self) -> None:
        self.used: set[ModelHandle] = set()

    def __enter__(self) -> set[ModelHandle]:
        self._token = _USED.set(self.used)
        return self.used

    def __exit__(self, *exc: object) -> None:
        _USED.reset(self._token)


@dataclass(eq=False)
class _Entry:
    model: Any
    bytes: int
    on_device: bool = False  # where the model is meant to be, as the budget counts it (decided under the lock)
    placed: bool = False  # where it is (changed only while holding `moving`)
    holders: int = 0
    streamed: bool = False  # sequential offload: accelerate moves each layer in and out by itself
    moving: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass(eq=False)
class _Loading:
    """A load in progress; the threads that ask for the same model meanwhile wait for it instead of loading it too."""

    done: threading.Event = field(default_factory=threading.Event)
    waiters: int = 0
    entry: _Entry | None = None
    error: BaseException | None = None


def module_bytes(model: Any) -> int:
    """Bytes a torch module's parameters and buffers really store, quantised ones too (0 for anything else)."""
    if not hasattr(model, "parameters"):
        return 0
    from graphflow.models.quantization import tensor_bytes

    return sum(tensor_bytes(tensor) for tensor in [*model.parameters(), *model.buffers()])


class ModelManager:
    """Loads models once and places them on their device, keeping `budget_bytes` (when set) on it.

    `offload`: `none` keeps models on the device; `model` moves each to the device only while a
    node holds it; `sequential` streams weights layer by layer from the CPU (accelerate), for GPUs
    too small for one model. `compile` (True or a torch.compile mode) is the `compile` run option of the Engines
    using this manager unless they set their own (graphflow.models.compilation): models are never compiled in
    place, a node runs a compiled wrapper sharing their weights.
    Without a budget on a GPU, models are evicted when free GPU memory would drop below
    `reserve_bytes`.
    """

    def __init__(self, budget_bytes: int | None = None, *, offload: str = "none", compile: bool | str = False,
                 reserve_bytes: int = 1 << 30) -> None:
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"unknown offload mode '{offload}'; expected one of {', '.join(OFFLOAD_MODES)}")
        self.budget_bytes = budget_bytes
        self.offload = offload
        self.compile = compile
        self.reserve_bytes = reserve_bytes
        self.loads: Counter[ModelKey] = Counter()
        self.placements: Counter[ModelKey] = Counter()  # times each model was put on its device (budget-counted)
        self._handles: dict[ModelKey, ModelHandle] = {}
        self._entries: OrderedDict[ModelKey, _Entry] = OrderedDict()
        self._loading: dict[ModelKey, _Loading] = {}
        # guards the dicts, counts and placement decisions above; never held while a model loads or moves
        self._lock = threading.Lock()

    def handle(self, key: ModelKey, load: Callable[[], Any], config: dict[str, Any] | None = None) -> ModelHandle:
        """The one handle for `key`; `load()` returns the model on the CPU in the key's dtype, and runs
        at the first `use`, not here."""
        with self._lock:
            existing = self._handles.get(key)
            if existing is None:
                existing = self._handles[key] = ModelHandle(key, self, load, dict(config or {}))
            return existing

    @contextmanager
    def use(self, handle: ModelHandle, *, offload_after: bool = False) -> Iterator[Any]:
        """The handle's model, loaded once however many threads ask for it at once, on its device while held;
        with `offload_after` (or offload mode `model`) it leaves the device when its last holder lets go."""
        used = _USED.get()
        if used is not None:
            used.add(handle)
        entry = self._hold(handle)
        try:
            self._place(handle.key, entry)
            yield entry.model
        finally:
            with self._lock:
                entry.holders -= 1
                offload = (offload_after or self.offload == "model") and entry.holders == 0 and entry.on_device
                if offload:
                    entry.on_device = False
            if offload:
                self._settle(handle.key, entry)

    @property
    def device_bytes(self) -> int:
        """Bytes of the models now on their devices (counting CPU-device models as on device)."""
        with self._lock:
            return sum(entry.bytes for entry in self._entries.values() if entry.on_device)

    def on_device(self) -> list[ModelKey]:
        """The loaded models now on their devices, as the budget counts them."""
        with self._lock:
            return [key for key, entry in self._entries.items() if entry.on_device]

    def loaded(self) -> list[ModelKey]:
        with self._lock:
            return list(self._entries)

    def holders(self, key: ModelKey) -> int:
        """How many `use` blocks hold the model of `key` now."""
        with self._lock:
            entry = self._entries.get(key)
            return entry.holders if entry is not None else 0

    def clear(self) -> None:
        """Forget every loaded model (handles stay valid and load again on their next use)."""
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.holders == 0:
                    del self._entries[key]

    def _hold(self, handle: ModelHandle) -> _Entry:
        """The handle's entry, with this caller counted among its holders. The first caller loads it, outside the
        lock (so other models load meanwhile); callers arriving during the load wait for it, and share its error."""
        with self._lock:
            entry = self._entries.get(handle.key)
            if entry is not None:
                entry.holders += 1
                return entry
            loading = self._loading.get(handle.key)
            if loading is None:
                loading = self._loading[handle.key] = _Loading()
                first = True
            else:
                loading.waiters += 1
                first = False
        if first:
            return self._load(handle, loading)
        loading.done.wait()
        if loading.error is not None:
            raise loading.error
        assert loading.entry is not None  # set with `done` whenever no error is
        return loading.entry

    def _load(self, handle: ModelHandle, loading: _Loading) -> _Entry:
        try:
            entry = self._prepare(handle)
        except BaseException as error:
            with self._lock:
                del self._loading[handle.key]  # a later use tries again
                loading.error = error
            loading.done.set()
            raise
        with self._lock:
            entry.holders = 1 + loading.waiters  # counted before anyone can see the entry, so none can evict it
            self._entries[handle.key] = loading.entry = entry
            self.loads[handle.key] += 1
            del self._loading[handle.key]
        loading.done.set()
        return entry

    def _prepare(self, handle: ModelHandle) -> _Entry:
        log.info("loading %s", handle.key)
        with LOAD_LOCK:
            model = handle.load()
        if hasattr(model, "eval"):
            model.eval()  # gradients stay as loaded: nodes run under no_grad, and freezing fp16 weights
            # would change which CPU kernels run, and so the pixels, against a stock diffusers pipeline
        entry = _Entry(model, module_bytes(model))
        if self.offload == "sequential" and handle.key.device != "cpu" and hasattr(model, "parameters"):
            from accelerate import cpu_offload

            cpu_offload(model, execution_device=handle.key.device)
            entry.streamed = True
        return entry

    def _place(self, key: ModelKey, entry: _Entry) -> None:
        """Put a held model on its device, first moving idle ones off when the budget says there is no room."""
        with self._lock:
            self._entries.move_to_end(key)
            if entry.on_device or entry.streamed:
                victims = []
            else:
                victims = self._make_room(key, entry.bytes)
                entry.on_device = True
                self.placements[key] += 1
        for other, evicted in victims:
            self._settle(other, evicted)
        self._settle(key, entry)

    def _settle(self, key: ModelKey, entry: _Entry) -> None:
        """Move a model to where it is meant to be now. Moves of one model are serialised, and each applies the
        latest decision, so the last one leaves it where the budget counts it."""
        if key.device == "cpu" or entry.streamed or not hasattr(entry.model, "to"):
            return
        with entry.moving:
            with self._lock:
                wanted = entry.on_device
            if entry.placed != wanted:
                entry.model.to(key.device if wanted else "cpu")
                entry.placed = wanted

    def _make_room(self, key: ModelKey, needed: int) -> list[tuple[ModelKey, _Entry]]:
        """Mark least recently used models nobody holds as off the device until `needed` more bytes fit on
        `key.device`; returns those to move off (on the CPU device they are dropped instead). Under the lock."""
        victims = []
        for other, entry in list(self._entries.items()):
            if not self._short_of(key.device, needed):
                return victims
            if other == key or entry.holders or not entry.on_device or entry.streamed or other.device != key.device:
                continue
            entry.on_device = False
            if other.device == "cpu":
                log.info("unloading %s to stay within the memory budget", other)
                del self._entries[other]
            else:
                log.info("offloading %s to the CPU to make room on %s", other, other.device)
                victims.append((other, entry))
        if self._short_of(key.device, needed):
            log.warning("%s does not fit in the model memory budget even after evicting every idle model; "
                        "loading it anyway (try --offload model)", key)
        return victims

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
