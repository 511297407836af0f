"""torch.compile for the modules a run uses, chosen per run: `compile`, `compile_components`, `compile_backend`.

They are run options (`Engine(options=...)`, `engine.run(..., options=...)`, `graphflow run --compile [MODE]
--compile-components unet,vae`), and `ModelManager(compile=...)` gives the default of the Engines using it:

- `compile`: off (None, False), True (= "default"), or a torch.compile mode: default, reduce-overhead,
  max-autotune, max-autotune-no-cudagraphs.
- `compile_components`: which modules run compiled: unet, controlnet, vae, text_encoder (default unet,controlnet);
  a list, or one comma-separated string.
- `compile_backend`: torch.compile's backend (default inductor; e.g. "eager" or "aot_eager" to check a graph
  traces without inductor's code generation).

Models are shared by every run in the process, and a run option may change from one run to the next, so the
shared module is never compiled in place: the loaders put the run's choice into the MODEL, CLIP, VAE and CONTROLNET
values they output (so it is part of their cache keys and of everything downstream), and the module a node holds is
wrapped while it uses it (`torch.compile(module, mode=...)`, an OptimizedModule sharing the module's weights; for
a VAE its `encode` and `decode`). TorchDynamo keeps what it compiled with the module's own code, guarded on the
module, its mode and backend, so a wrapper made at each use compiles once per (module, mode, backend), and nothing
here keeps a model alive after the manager drops it.

Compiled modules may differ from eager ones in the last bits (inductor fuses and reorders float operations), which
is why the choice is keyed: per component (`compile_unet`, ...), so that compiling the UNet does not re-run a
VAELoader's graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from graphflow.errors import GraphflowError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPONENTS = ("unet", "controlnet", "vae", "text_encoder")
DEFAULT_COMPONENTS = ("unet", "controlnet")
KEYED = tuple(f"compile_{component}" for component in COMPONENTS)  # what the loaders key, one per component


class CompileOptionError(GraphflowError):
    """A compile option with a value it cannot take."""


@dataclass(frozen=True)
class Compilation:
    """How a module runs compiled: torch.compile's mode and backend."""

    mode: str = "default"
    backend: str = "inductor"

    def __str__(self) -> str:
        return self.mode if self.backend == "inductor" else f"{self.mode} ({self.backend})"

    def wrap(self, module: Any) -> Any:
        """`module` compiled: an OptimizedModule sharing its weights (attributes read through to the module); a
        module's method (a VAE's encode) compiles to a function calling it."""
        import torch

        return torch.compile(module, mode=self.mode, backend=self.backend)

    def wrap_vae(self, module: Any) -> Any:
        """A VAE whose `encode` and `decode` run compiled (its forward is neither), everything else its own."""
        return _CompiledVae(module, self)


class _CompiledVae:
    """A VAE module with compiled `encode` / `decode`; other attributes are the module's."""

    def __init__(self, module: Any, compilation: Compilation) -> None:
        self._orig_mod = module
        self.encode = compilation.wrap(module.encode)
        self.decode = compilation.wrap(module.decode)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._orig_mod, name)


def compilation(options: Mapping[str, Any], component: str) -> Compilation | None:
    """How the run's `options` compile `component` (one of COMPONENTS); None: it runs eagerly.
    Raise CompileOptionError on a bad value."""
    mode = _mode(options.get("compile"))
    components = _components(options.get("compile_components"))
    backend = _backend(options.get("compile_backend"))
    if mode is None or component not in components:
        return None
    return Compilation(mode, backend)


def keyed(options: Mapping[str, Any]) -> Mapping[str, Any]:
    """`options` with one entry per component (`compile_unet`, ...): how it is compiled, None when it is not; so
    that off, False and None key one result, True keys as "default", and a component list that leaves a module
    out keys its loader as eager. A bad value keys every loader as that value, so they run and report why."""
    try:
        chosen = {name: compilation(options, component) for name, component in zip(KEYED, COMPONENTS, strict=True)}
    except CompileOptionError as error:
        return {**options, **dict.fromkeys(KEYED, f"invalid: {error}")}
    return {**options, **{name: None if value is None else str(value) for name, value in chosen.items()}}


def parse_components(text: str) -> tuple[str, ...]:
    """A comma-separated component list ("unet,vae"), checked."""
    return _components(text)


def _mode(value: Any) -> str | None:
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if value in COMPILE_MODES:
        return str(value)
    raise CompileOptionError(f"option compile is {value!r}; expected true, false or a torch.compile mode "
                             f"({', '.join(COMPILE_MODES)})")


def _components(value: Any) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_COMPONENTS
    names: Iterable[Any] = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)):
        raise CompileOptionError(f"option compile_components is {value!r}; expected a list of "
                                 f"{', '.join(COMPONENTS)}")
    chosen = tuple(name.strip() if isinstance(name, str) else name for name in names)
    unknown = [name for name in chosen if name not in COMPONENTS]
    if unknown or not chosen:
        raise CompileOptionError(f"option compile_components names {unknown[0] if unknown else 'nothing'!r}; "
                                 f"expected some of {', '.join(COMPONENTS)}")
    return tuple(name for name in COMPONENTS if name in chosen)


def _backend(value: Any) -> str:
    if value is None:
        return "inductor"
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise CompileOptionError(f"option compile_backend is {value!r}; expected the name of a torch.compile backend "
                             "(inductor, aot_eager, eager, ...)")
