"""Memory options for large images: VAE tiling and slicing, attention slicing, applied while a node holds a module.

They are run options (`Engine(options=...)`, `engine.run(..., options=...)`, `graphflow run --vae-tiling ...`):

- `vae_tiling` (bool): VAEEncode and VAEDecode work in overlapping tiles, blended at the seams (diffusers'
  `vae.enable_tiling()`); `vae_tile_size` (pixels, a multiple of the VAE's pixels per latent) sets the tile, by
  default the VAE's `sample_size` (512 for SD1.5, 1024 for SDXL) as in diffusers. Changes pixels.
- `vae_slicing` (bool): a batch goes through the VAE one image at a time (`vae.enable_slicing()`).
- `attention_slicing` ("auto", "max", a slice size, or True for "auto"): the UNet and ControlNets compute
  attention in slices (`pipe.enable_attention_slicing(slice_size)`).
- `swap_controlnets` (bool): the Sampler holds each ControlNet only inside its guidance window: one whose window
  has not begun is not loaded yet, one whose window has ended leaves the device (`ModelManager.use(...,
  offload_after=True)`), so many ControlNets with windows need the memory of those active at once. The same pixels.

None of the first four is bit-equal to the default path (on the CPU with the tiny models slicing changes the last float
bits, ~1e-6; tiling changes pixels), so each joins the cache keys of the nodes using it (`keyed`).

diffusers switches these on the module that every graph shares; `configured_vae` and `sliced_attention` do it
only inside a block that holds the module alone (`exclusive`: the per-module lock of model patches) and put the
module back as it was on exit, so a graph running at the same time without them never sees them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, NamedTuple

from graphflow.errors import GraphflowError
from graphflow.models.manager import ModelHandle

VAE_OPTIONS = ("vae_tiling", "vae_tile_size", "vae_slicing")  # what VAEEncode and VAEDecode key
ATTENTION_OPTIONS = ("attention_slicing",)  # what the Sampler keys
_SLICES = ("auto", "max")
_VAE_ATTRIBUTES = ("use_tiling", "use_slicing", "tile_sample_min_size", "tile_latent_min_size")


class MemoryOptionError(GraphflowError):
    """A memory option with a value it cannot take, or one the module cannot do."""


class MemoryOptions(NamedTuple):
    """The memory options of a run, checked: off by default."""

    vae_tiling: bool = False
    vae_tile_size: int | None = None  # pixels; None: the VAE's own (its config's sample_size)
    vae_slicing: bool = False
    attention_slicing: str | int | None = None  # None: off; "auto", "max" or a slice size
    swap_controlnets: bool = False  # the same pixels: never keyed

    def keyed(self) -> dict[str, Any]:
        """The options as cache keys hold them: a tile size only counts when tiling is on."""
        return {"vae_tiling": self.vae_tiling, "vae_tile_size": self.vae_tile_size if self.vae_tiling else None,
                "vae_slicing": self.vae_slicing, "attention_slicing": self.attention_slicing}


def memory_options(options: Mapping[str, Any]) -> MemoryOptions:
    """The memory options in a run's `options`; unset (or None) is off. Raise MemoryOptionError on a bad value."""
    return MemoryOptions(_flag(options, "vae_tiling"), _tile_size(options.get("vae_tile_size")),
                         _flag(options, "vae_slicing"), _slice_size(options.get("attention_slicing")),
                         _flag(options, "swap_controlnets"))


def keyed(options: Mapping[str, Any]) -> Mapping[str, Any]:
    """`options` with the memory options as cache keys hold them, so that unset, None and False key one result.
    Bad values are kept as given: the node using them reports why."""
    try:
        return {**options, **memory_options(options).keyed()}
    except MemoryOptionError:
        return options


def _flag(options: Mapping[str, Any], name: str) -> bool:
    value = options.get(name)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise MemoryOptionError(f"option {name} is {value!r}; expected true or false")


def _tile_size(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 8:
        raise MemoryOptionError(f"option vae_tile_size is {value!r}; expected a tile size in pixels, at least 8")
    return value


def _slice_size(value: Any) -> str | int | None:
    if value is None or value is False:
        return None
    if value is True:
        return "auto"
    if value in _SLICES or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise MemoryOptionError(f"option attention_slicing is {value!r}; expected 'auto', 'max' or a slice size (a "
                            "positive number of attention heads per slice)")


def exclusive(handle: ModelHandle) -> AbstractContextManager[Any]:
    """`with exclusive(handle) as module:` the module held, and used by no other block meanwhile."""
    from graphflow.models.patches import patched

    return patched(handle, (), "")


@contextmanager
def configured_vae(module: Any, options: MemoryOptions, scale: int) -> Iterator[Any]:
    """The VAE `module` (held by `exclusive`) tiled / sliced as `options` ask inside the block, as it was after.

    `scale` is the VAE's pixels per latent: a tile of `vae_tile_size` pixels is that size / scale latents.
    """
    if not (options.vae_tiling or options.vae_slicing):
        yield module
        return
    before = {name: getattr(module, name) for name in _VAE_ATTRIBUTES if hasattr(module, name)}
    try:
        if options.vae_tiling:
            _enable(module, "enable_tiling", "vae_tiling")
            if options.vae_tile_size is not None:
                if options.vae_tile_size % scale:
                    raise MemoryOptionError(f"option vae_tile_size is {options.vae_tile_size}; this VAE needs a "
                                            f"multiple of its {scale} pixels per latent")
                module.tile_sample_min_size = options.vae_tile_size
                module.tile_latent_min_size = options.vae_tile_size // scale
        if options.vae_slicing:
            _enable(module, "enable_slicing", "vae_slicing")
        yield module
    finally:
        for name, value in before.items():
            setattr(module, name, value)


def _enable(module: Any, method: str, option: str) -> None:
    try:
        getattr(module, method)()
    except (AttributeError, NotImplementedError) as error:
        raise MemoryOptionError(f"option {option}: the VAE ({type(module).__name__}) cannot do it") from error


@contextmanager
def sliced_attention(module: Any, slice_size: str | int | None) -> Iterator[Any]:
    """The UNet or ControlNet `module` (held alone) computing attention in slices of `slice_size` inside the block
    (diffusers' `set_attention_slice`), with its own attention processors again after."""
    if slice_size is None:
        yield module
        return
    before = module.attn_processors
    try:
        try:
            module.set_attention_slice(slice_size)
        except ValueError as error:
            raise MemoryOptionError(f"option attention_slicing {slice_size!r} does not fit "
                                    f"{type(module).__name__}: {error}") from error
        yield module
    finally:
        module.set_attn_processor(before)


def hold_sliced(held: ExitStack, handles: list[ModelHandle], slice_size: str | int | None) -> list[Any]:
    """The modules of `handles` (in their order), each held alone by `held` and computing attention in slices of
    `slice_size`. They are taken in one fixed order (by model key), so that two runs sharing some of them never
    wait for each other in a circle."""
    modules: dict[int, Any] = {}
    for handle in sorted({id(handle): handle for handle in handles}.values(), key=lambda handle: repr(handle.key)):
        modules[id(handle)] = held.enter_context(sliced_attention(held.enter_context(exclusive(handle)), slice_size))
    return [modules[id(handle)] for handle in handles]
