"""Which device and dtype a model runs on, from the `--device` / `--dtype` options."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "fp16", "bf16", "fp32")


def resolve_device(option: str | None = "auto") -> str:
    """`auto` is CUDA when there is one, then Apple's MPS, else the CPU; others are checked to exist."""
    import torch

    option = option or "auto"
    if option == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if option.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{option}' was asked for, but PyTorch sees no CUDA GPU "
                           f"(torch {torch.__version__}); use --device cpu or auto")
    if option == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' was asked for, but PyTorch has no MPS backend here; use --device cpu or auto")
    return option


def resolve_dtype(option: str | None, device: str) -> str:
    """`auto` is fp16 on CUDA and MPS, fp32 on the CPU (where half precision is slow and inexact)."""
    option = option or "auto"
    if option == "auto":
        return "fp32" if device == "cpu" else "fp16"
    if option not in DTYPES:
        raise ValueError(f"unknown dtype '{option}'; expected one of {', '.join(DTYPES)}")
    return option


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


class Placement(NamedTuple):
    """Where a model runs: resolved device and dtype names, e.g. ("cuda", "fp16")."""

    device: str
    dtype: str


def placement(options: dict[str, object]) -> Placement:
    """The resolved device and dtype a node runs with, from the engine's options."""
    device = resolve_device(str(options.get("device") or "auto"))
    return Placement(device, resolve_dtype(str(options.get("dtype") or "auto"), device))


def keyed_options(options: Mapping[str, Any]) -> Mapping[str, Any]:
    """`options` with device and dtype as they resolve on this machine: what cache keys hold, so that `auto` keys
    fp16 on a GPU and fp32 on a CPU (a disk cache shared by both keeps them apart), and `None`, `auto` and `cpu`
    key one result where they mean the same; the memory and compile options likewise (graphflow.models.memory,
    graphflow.models.compilation). Options that do not resolve are kept as given: the node that uses them reports
    why."""
    from graphflow.models import compilation, memory

    options = memory.keyed(options)  # vae_tiling, attention_slicing, ...: unset and off key one result
    options = compilation.keyed(options)  # compile_unet, ...: how each component is compiled, None when it is not
    try:
        where = placement(dict(options))
    except (RuntimeError, ValueError):
        return options
    return {**options, "device": where.device, "dtype": where.dtype}
