"""8-bit and 4-bit weights for UNets, ControlNets and text encoders, through the libraries' quantization configs.

A loader's `quantize` (int8, int4, fp8, nf4) and `quantize_backend` (auto, torchao, quanto, bitsandbytes) resolve to
one `Quantization`, which goes to `from_pretrained` as diffusers' `TorchAoConfig` / `QuantoConfig` /
`BitsAndBytesConfig` (transformers' classes of the same names for the CLIP text encoders). It is part of the
model's `ModelKey`, so a quantised model and its full-precision original are two models, never one shared.

What each backend does here (measured on the CPU with the tiny models, see benchmarks/quantize_memory.py):

| backend | modes | devices |
| --- | --- | --- |
| torchao | int8, fp8 (weight-only); int4 (CUDA only, with torchao's int4 kernels) | CPU, CUDA |
| quanto (optimum-quanto) | int8, int4, fp8 (weight-only) | CPU, CUDA |
| bitsandbytes | int8 (LLM.int8), nf4 | CUDA only: it refuses to load without a GPU |

Only linear layers are quantised (convolutions stay as they are), so an SD1.5 UNet shrinks to about 70 % of its
fp32 bytes at int8. torchao and quanto are the `graphflow[quantize]` extra; bitsandbytes is installed on its own.
Nothing here imports torch, torchao or quanto at import time.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from graphflow.errors import NodeInputError

MODES = ("none", "int8", "int4", "fp8", "nf4")
BACKENDS = ("auto", "torchao", "quanto", "bitsandbytes")
_MODULES = {"torchao": "torchao", "quanto": "optimum.quanto", "bitsandbytes": "bitsandbytes"}
_OFFERS = {"torchao": ("int8", "int4", "fp8"), "quanto": ("int8", "int4", "fp8"), "bitsandbytes": ("int8", "nf4")}
_CUDA_ONLY = {("bitsandbytes", "int8"), ("bitsandbytes", "nf4"), ("torchao", "int4")}
EXTRA = "graphflow[quantize]"


class QuantizationError(NodeInputError):
    """A quantize setting a loader cannot do here (unknown, not offered by the backend, not on this device)."""


@dataclass(frozen=True)
class Quantization:
    """One way to quantise weights: a mode (int8, int4, fp8, nf4) done by a backend (torchao, quanto,
    bitsandbytes)."""

    mode: str
    backend: str

    def __str__(self) -> str:
        return f"{self.mode} ({self.backend})"

    def config(self, library: str) -> Any:
        """The quantization config `from_pretrained` of `library` ("diffusers" or "transformers") takes."""
        classes = importlib.import_module(library)
        if self.backend == "torchao":
            from torchao.quantization import Float8WeightOnlyConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig

            config = {"int8": Int8WeightOnlyConfig, "int4": Int4WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}
            return classes.TorchAoConfig(config[self.mode]())
        if self.backend == "quanto":
            weights = {"int8": "int8", "int4": "int4", "fp8": "float8"}[self.mode]
            if library == "transformers":
                return classes.QuantoConfig(weights=weights)
            return classes.QuantoConfig(weights_dtype=weights)
        if self.mode == "nf4":
            return classes.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        return classes.BitsAndBytesConfig(load_in_8bit=True)


def quantization(mode: str, backend: str, device: str) -> Quantization | None:
    """The Quantization a loader's `quantize` and `quantize_backend` inputs ask for on `device`; None for "none".
    Raise QuantizationError, naming what would work instead, when it cannot be done here."""
    if mode not in MODES:
        raise QuantizationError(f"input quantize is {mode!r}; expected one of {', '.join(MODES)}")
    if backend not in BACKENDS:
        raise QuantizationError(f"input quantize_backend is {backend!r}; expected one of {', '.join(BACKENDS)}")
    if mode == "none":
        return None
    chosen = _auto_backend(mode, device) if backend == "auto" else backend
    if mode not in _OFFERS[chosen]:
        offering = [name for name, modes in _OFFERS.items() if mode in modes]
        raise QuantizationError(f"input quantize is {mode!r}, which {chosen} does not offer ({chosen} offers "
                                f"{', '.join(_OFFERS[chosen])}); set quantize_backend to {' or '.join(offering)}")
    if (chosen, mode) in _CUDA_ONLY and not device.startswith("cuda"):
        raise QuantizationError(_needs_cuda(chosen, mode, device))
    if not installed(chosen):
        raise QuantizationError(_not_installed(chosen))
    return Quantization(mode, chosen)


def installed(backend: str) -> bool:
    """Whether the backend's package can be imported here (found, not imported)."""
    module = _MODULES[backend]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # optimum without quanto
        return False


def _auto_backend(mode: str, device: str) -> str:
    """torchao for int8 and fp8, quanto for int4 off CUDA (and whenever torchao is missing), bitsandbytes for nf4."""
    if mode == "nf4":
        return "bitsandbytes"
    if mode == "int4" and not device.startswith("cuda"):
        return "quanto"
    if installed("torchao") or not installed("quanto"):
        return "torchao"
    return "quanto"


def _needs_cuda(backend: str, mode: str, device: str) -> str:
    if backend == "bitsandbytes":
        instead = ("int4 with quantize_backend quanto" if mode == "nf4" else
                   "quantize_backend torchao or quanto, which quantise int8 on the CPU too")
        return (f"input quantize_backend is bitsandbytes, which needs a CUDA GPU (it refuses to load a model without "
                f"one), but the device is {device}; use {instead} ({EXTRA}), or run on a GPU")
    return (f"input quantize is {mode!r} with {backend}, whose int4 kernels need a CUDA GPU, but the device is "
            f"{device}; set quantize_backend to quanto for int4 on the CPU ({EXTRA})")


def _not_installed(backend: str) -> str:
    if backend == "bitsandbytes":
        return ("input quantize_backend is bitsandbytes, which is not installed: pip install 'bitsandbytes>=0.48' "
                f"(CUDA only), or use quantize_backend torchao or quanto ({EXTRA})")
    package = {"torchao": "torchao", "quanto": "optimum-quanto"}[backend]
    return (f"quantization with {backend} needs the {package} package, which is not installed: "
            f"pip install '{EXTRA}'")


def tensor_bytes(tensor: Any) -> int:
    """The bytes a tensor really stores: for a quantised tensor (a torchao or quanto tensor subclass, whose
    element_size is that of the dtype it stands for) the sum of the tensors it is made of (data, scales, ...)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    stored = tensor.element_size() * tensor.nelement()
    state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: the blocks' absmax beside the packed data
    absmax = getattr(state, "absmax", None)
    return stored + (tensor_bytes(absmax) if absmax is not None else 0)
