"""Model patches: changes to a model's weights or behaviour (LoRA) that a MODEL or CLIP value carries.

A patch never changes the module other values share outside the block that uses it: `patched` applies a
value's patches to the held module on entry and removes them on exit, and while any block uses a module
through `patched` no other does (patched or not), so two graphs, one with a LoRA and one without, never see
each other's weights.

LoRA is applied as diffusers applies it for `pipe.load_lora_weights(...)` + `pipe.set_adapters(names, weights)`,
with diffusers' and peft's own functions (so the pixels are diffusers'): the file's tensors go through the pipeline's
`lora_state_dict` (which also converts kohya / A1111 key names), the UNet's part through `load_lora_into_unet`, the
text encoders' parts through the steps of diffusers' `_load_lora_into_text_encoder` (see `_inject_text_encoder`), and
the strengths through `set_adapters`. Injecting costs ~0.3 s on a full-size SD1.5 UNet, so an injected set of LoRAs
is kept per module (`_Injected`): on exit its peft layers are taken out again, the module's own layers put back, and
the next use of the same LoRAs puts the same peft layers back in and only sets the strengths.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphflow.errors import GraphflowError
from graphflow.models.manager import LOAD_LOCK, ModelHandle, ModelKey, ModelManager
from graphflow.models.sources import ModelNotFoundError, ModelSource, refuse_pickle, require_safetensors, verified

ROLES = ("unet", "text_encoder", "text_encoder_2")  # the prefixes of a diffusers LoRA's keys, one per module
LORA_FILES = ("*.safetensors",)  # what a LoRA folder or hub repository must hold (locate's `files`)
_PREFERRED_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, taken first when a folder holds several
_INJECTED_PER_MODULE = 4  # sets of injected LoRAs kept per module (their weights stay on its device)

_LOCKS: dict[Any, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


class PatchError(GraphflowError):
    """A patch cannot be applied to the module a node uses (wrong model, unsupported offload mode, ...)."""


def _lock(handle: ModelHandle) -> threading.RLock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(handle.key, threading.RLock())


@dataclass(frozen=True, eq=False)
class LoraPatch:
    """One LoRA file at one strength (diffusers' adapter weight); the MODEL and CLIP values of a LoraLoader each
    carry one, with strength_model and strength_clip."""

    weights: ModelHandle  # the file's tensors (LoraWeights), held by the model manager like any model
    strength: float

    def applies_to(self, role: str) -> bool:
        """Strength 0 leaves the LoRA out, as ComfyUI does (diffusers' weight 0 adds zeros: the same pixels)."""
        return self.strength != 0 and role in self.weights.config["roles"]


@dataclass(eq=False)
class LoraWeights:
    """A LoRA's tensors after the pipeline's `lora_state_dict`: diffusers' key names prefixed by the module they
    patch ("unet.", "text_encoder.", "text_encoder_2."), kohya's alphas, the file's adapter metadata."""

    state_dict: dict[str, Any] = field(repr=False)
    network_alphas: dict[str, float] | None = field(repr=False)
    metadata: dict[str, Any] | None = field(repr=False)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(role for role in ROLES if any(key.startswith(f"{role}.") for key in self.state_dict))

    def parameters(self) -> list[Any]:  # what the manager counts (module_bytes)
        return list(self.state_dict.values())

    def buffers(self) -> list[Any]:
        return []


def lora_file(source: ModelSource) -> Path:
    """The weights file of a located LoRA: the file itself, or the folder's (hub snapshot's) one .safetensors file,
    pytorch_lora_weights.safetensors when it holds several (diffusers' `_best_guess_weight_name` rules)."""
    if source.kind == "file":
        return source.path
    candidates = sorted(path.name for path in source.path.glob("*.safetensors")
                        if not any(word in path.name for word in ("scheduler", "optimizer", "checkpoint")))
    if not candidates:
        require_safetensors(source.path, f"LoRA '{source.name}'")  # names a pickle, if that is all there is
        raise ModelNotFoundError(f"LoRA '{source.name}': no .safetensors file in {source.path}")
    if len(candidates) == 1 or _PREFERRED_FILE in candidates:
        return source.path / (candidates[0] if len(candidates) == 1 else _PREFERRED_FILE)
    raise ModelNotFoundError(f"LoRA '{source.name}': {source.path} holds several .safetensors files "
                             f"({', '.join(candidates[:5])}); name the file itself")


def load_lora(manager: ModelManager, source: ModelSource, family: str, unet_config: dict[str, Any]) -> ModelHandle:
    """The handle of a LoRA's tensors as the `family`'s pipeline reads them, loaded (and checked) now, so that a file
    that is no LoRA fails in its loader node rather than in a later Sampler."""
    path = lora_file(source)
    # SDXL pipelines map kohya's SGM block names with the UNet's layers_per_block, so it is part of what was read
    kind = f"sdxl lora ({unet_config.get('layers_per_block', 2)} layers per block)" if family == "sdxl" else \
        f"{family} lora"
    key = ModelKey(kind, source.key, path.name if source.kind != "file" else "", "as stored", "cpu")
    load = verified(lambda: read_lora(path, family, unet_config), source)
    handle = manager.handle(key, load)
    with handle.use() as weights:
        handle.config["roles"] = weights.roles
    return handle


def read_lora(path: Path, family: str, unet_config: dict[str, Any]) -> LoraWeights:
    """The tensors and adapter metadata of a .safetensors LoRA (never a pickle), read as diffusers'
    `load_lora_weights` reads them (`lora_state_dict`, which converts kohya and A1111 names)."""
    from diffusers.configuration_utils import FrozenDict
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import SafetensorError, safe_open

    refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:  # one open: tensors and header agree
            header = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 - as load_file reads
    except (OSError, SafetensorError) as error:
        raise ModelNotFoundError(f"'{path}' is not a readable .safetensors LoRA ({error})") from error
    try:
        raw = header.get(LORA_ADAPTER_METADATA_KEY)
        metadata = json.loads(raw) if raw else None  # diffusers' _load_sft_state_dict_metadata
    except json.JSONDecodeError as error:
        raise ModelNotFoundError(f"'{path}': its LoRA adapter metadata is not JSON ({error})") from error
    try:
        if family == "sdxl":
            state_dict, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
                tensors, unet_config=FrozenDict(unet_config))
        else:
            state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(tensors)
    except (ValueError, KeyError, IndexError) as error:
        raise ModelNotFoundError(f"'{path}' is not a LoRA diffusers can read: {error}") from error
    odd = [name for name in state_dict if "lora" not in name]
    if odd or not state_dict:
        raise ModelNotFoundError(f"'{path}' is not a LoRA: every tensor name of one holds 'lora' (diffusers' check), "
                                 f"and {', '.join(odd[:3]) or 'it has no tensors'} does not")
    weights = LoraWeights(state_dict, alphas, metadata)
    if not weights.roles:
        raise ModelNotFoundError(f"'{path}' patches neither a UNet nor a text encoder (its tensors are named like "
                                 f"{', '.join(list(state_dict)[:3])})")
    return weights


@contextmanager
def patched(handle: ModelHandle, patches: tuple[Any, ...], role: str) -> Iterator[Any]:
    """The module of `handle`, held, with `patches` (those for `role`: "unet", "text_encoder", ...) applied."""
    # patches that add to each denoiser call instead (IP-Adapters: a `contributor` class method) are the Sampler's
    unknown = [kind for kind in {type(patch) for patch in patches}
               if kind is not LoraPatch and not hasattr(kind, "contributor")]
    if unknown:
        raise TypeError(f"unknown kind of model patch: {unknown[0].__name__}")
    wanted = [patch for patch in patches if isinstance(patch, LoraPatch) and patch.applies_to(role)]
    request = tuple((patch.weights.key, patch.strength) for patch in wanted)
    with _lock(handle), handle.use() as module:
        state = _state(module)
        if state.depth:  # used again inside its own block (the lock lets the same thread in): only as it is
            if request != state.request:
                raise PatchError(f"{handle.key} is in use with other patches by this thread already")
            state.depth += 1
            try:
                yield module
            finally:
                state.depth -= 1
            return
        with ExitStack() as held:
            if wanted:
                if handle.manager.offload == "sequential" and handle.key.device != "cpu":
                    raise PatchError(f"LoRA cannot patch {handle.key} under sequential offload (its layers stream "
                                     "from the CPU one by one); use offload 'model' or 'none'")
                loras = [held.enter_context(patch.weights.use()) for patch in wanted]  # held; their files checked
                injected = _attach(state, module, role, wanted, loras, handle)
                held.callback(injected.detach, module, offload=handle.manager.offload == "model")
                strengths = tuple(patch.strength for patch in wanted)
                if injected.strengths != strengths:  # else the kept layers hold these scales already
                    _set_strengths(module, role, injected.names, list(strengths))
                    injected.strengths = strengths
            state.depth, state.request = 1, request
            try:
                yield module
            finally:
                state.depth, state.request = 0, None


@dataclass(eq=False)
class _Injected:
    """LoRAs injected into one module, kept while they are not in use: peft's layers (each wrapping the module's own
    layer as its base_layer), where they go, and what injecting changed on the module itself."""

    names: tuple[str, ...]
    # (parent module, None for the module itself: kept here, it would never be collected; attribute; peft layer)
    layers: list[tuple[Any, str, Any]]
    attributes: dict[str, tuple[Any, Any]]  # what injection set on the module: name -> (its value, the one before)
    frozen: list[tuple[Any, bool]]  # base parameters injection froze (peft does), with their own requires_grad
    device: Any  # where the adapters' weights are
    # the strengths the layers' scales were last set to (diffusers' set_adapters computes them afresh from these; no
    # graphflow code scales LoRA layers otherwise)
    strengths: tuple[float, ...] | None = None

    def attach(self, module: Any) -> None:
        """Put the peft layers in place of the module's own layers again (on the module's device, if it moved)."""
        device = next(module.parameters()).device
        for parent, name, layer in self.layers:
            setattr(module if parent is None else parent, name, layer)
        if device != self.device:
            self._move(device)
        for name, (value, _) in self.attributes.items():
            module.__dict__[name] = value
        for parameter, _ in self.frozen:
            parameter.requires_grad_(False)

    def detach(self, module: Any, *, offload: bool) -> None:
        """Put the module's own layers back: the module is again exactly what it was before the first injection."""
        for parent, name, layer in self.layers:
            setattr(module if parent is None else parent, name, layer.base_layer)
        _restore(module, {name: before for name, (_, before) in self.attributes.items()})
        for parameter, requires_grad in self.frozen:
            parameter.requires_grad_(requires_grad)
        if offload:  # the module leaves its device after each use (offload "model"): the adapters' weights too
            self._move("cpu")

    def _move(self, device: Any) -> None:
        """The adapters' weights (not the base layers') to `device`, their dtypes as injection left them."""
        import torch

        device = torch.device(device)
        for _, _, layer in self.layers:
            for child_name, child in layer.named_children():
                if child_name != "base_layer":
                    child.to(device)
        self.device = device


_MISSING = object()


def _restore(module: Any, attributes: dict[str, Any]) -> None:
    for name, value in attributes.items():
        if value is _MISSING:
            module.__dict__.pop(name, None)
        else:
            module.__dict__[name] = value


@dataclass(eq=False)
class _ModuleState:
    """Per module: the LoRA sets injected into it (most recently used last), and the block using it now."""

    injected: OrderedDict[tuple[Any, ...], _Injected] = field(default_factory=OrderedDict)
    depth: int = 0  # nested blocks of one thread
    request: tuple[Any, ...] | None = None  # the (LoRA, strength) pairs applied in them


_STATES: weakref.WeakKeyDictionary[Any, _ModuleState] = weakref.WeakKeyDictionary()
_STATES_GUARD = threading.Lock()


def _state(module: Any) -> _ModuleState:
    with _STATES_GUARD:
        state = _STATES.get(module)
        if state is None:
            state = _STATES[module] = _ModuleState()
        return state


def _attach(state: _ModuleState, module: Any, role: str, patches: list[LoraPatch], loras: list[LoraWeights],
            handle: ModelHandle) -> _Injected:
    """The LoRAs' peft layers in the module: those kept from an earlier use of the same LoRAs, else injected now."""
    combination = tuple(patch.weights.key for patch in patches)
    injected = state.injected.get(combination)
    if injected is not None:
        state.injected.move_to_end(combination)
        injected.attach(module)
        return injected
    names = tuple(f"graphflow_{index}" for index in range(len(loras)))
    with LOAD_LOCK:  # peft builds the layers under accelerate's init_empty_weights, a process-global patch
        injected = _inject(module, role, names, loras, handle)
    state.injected[combination] = injected
    while len(state.injected) > _INJECTED_PER_MODULE:
        state.injected.popitem(last=False)
    return injected


def _inject(module: Any, role: str, names: tuple[str, ...], loras: list[LoraWeights], handle: ModelHandle) -> _Injected:
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    before = dict(module.__dict__)
    grads = [(parameter, parameter.requires_grad) for parameter in module.parameters()]

    def changed() -> dict[str, tuple[Any, Any]]:
        return {name: (value, before.get(name, _MISSING)) for name, value in module.__dict__.items()
                if before.get(name, _MISSING) is not value}

    try:
        for name, lora in zip(names, loras, strict=True):
            if role == "unet":
                _inject_unet(module, name, lora)
            else:
                _inject_text_encoder(module, role, name, lora)
    except Exception as error:
        recurse_remove_peft_layers(module)  # the module's own layers back, as diffusers' unload_lora_weights does
        _restore(module, {name: previous for name, (_, previous) in changed().items()})
        for parameter, requires_grad in grads:
            parameter.requires_grad_(requires_grad)
        raise PatchError(f"the LoRA does not fit {handle.key}: {type(error).__name__}: {error}") from error
    layers = []
    for path, layer in module.named_modules():
        if isinstance(layer, BaseTunerLayer):
            parent, _, attribute = path.rpartition(".")
            layers.append((module.get_submodule(parent) if parent else None, attribute, layer))
    frozen = [(parameter, requires_grad) for parameter, requires_grad in grads
              if requires_grad and not parameter.requires_grad]
    return _Injected(names, layers, changed(), frozen, next(module.parameters()).device)


def _inject_unet(unet: Any, name: str, lora: LoraWeights) -> None:
    """What the pipeline's load_lora_weights does for its UNet (low_cpu_mem_usage as its default: peft >= 0.13)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    StableDiffusionLoraLoaderMixin.load_lora_into_unet(dict(lora.state_dict), lora.network_alphas, unet,
                                                       adapter_name=name, metadata=lora.metadata,
                                                       low_cpu_mem_usage=True)


def _inject_text_encoder(encoder: Any, prefix: str, name: str, lora: LoraWeights) -> None:
    """diffusers' `_load_lora_into_text_encoder`, step for step, except its last call, transformers'
    `load_adapter` (transformers 5.24 refuses peft < 0.22, the newest on PyPI being 0.21): here the same
    injection (peft's `inject_adapter_in_model`, on the meta device), the same tensors (`set_peft_model_state_dict`),
    frozen as transformers' inference mode leaves them, then cast to the encoder's dtype as diffusers does."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    state_dict = {key.removeprefix(f"{prefix}."): value for key, value in lora.state_dict.items()
                  if key.startswith(f"{prefix}.")}
    metadata = lora.metadata
    if metadata is not None:
        metadata = {key.removeprefix(f"{prefix}."): value for key, value in metadata.items()
                    if key.startswith(f"{prefix}.")}
    state_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))
    if not hasattr(encoder, "text_model"):  # CLIPTextModel is flat in transformers 5; older LoRAs name text_model.
        state_dict = {key.removeprefix("text_model."): value for key, value in state_dict.items()}
    rank = {}
    for module_name, _ in encoder.named_modules():
        if module_name.endswith((".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")):
            rank_key = f"{module_name}.lora_B.weight"
            if rank_key in state_dict:
                rank[rank_key] = state_dict[rank_key].shape[1]
    alphas = lora.network_alphas
    if alphas is not None:
        alphas = {key.removeprefix(f"{prefix}."): value for key, value in alphas.items()
                  if key.startswith(prefix) and key.split(".")[0] == prefix}
    config = _create_lora_config(state_dict, alphas, metadata, rank, is_unet=False)
    config.inference_mode = True  # transformers' load_adapter: not is_trainable
    inject_adapter_in_model(config, encoder, adapter_name=name, low_cpu_mem_usage=True)
    set_peft_model_state_dict(encoder, state_dict, adapter_name=name, low_cpu_mem_usage=True)
    encoder._hf_peft_config_loaded = True
    for module in encoder.modules():
        if isinstance(module, BaseTunerLayer):
            module.requires_grad_(False)
    encoder.to(device=encoder.device, dtype=encoder.dtype)


def _set_strengths(module: Any, role: str, names: tuple[str, ...], strengths: list[float]) -> None:
    """The pipeline's set_adapters(names, adapter_weights) for one of its modules."""
    if role == "unet":
        module.set_adapters(list(names), strengths)
    else:
        from diffusers.loaders.lora_base import set_adapters_for_text_encoder

        set_adapters_for_text_encoder(list(names), module, strengths)
