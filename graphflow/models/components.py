"""The values MODEL, CLIP, VAE and CONTROLNET outputs carry: small descriptions plus manager handles.

Weights stay with the ModelManager; these objects are what the result cache holds and what
nodes pass along. `config` on each handle is the component's `config.json`, read without
loading weights, so nodes can check compatibility (family, channels) before anything loads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from graphflow.models.compilation import Compilation
from graphflow.models.manager import ModelHandle

Family = Literal["sd15", "sdxl"]
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}


@dataclass(frozen=True, eq=False)
class DiffusionModel:
    """MODEL: the denoising UNet of a checkpoint and the scheduler settings it was trained with."""

    family: Family
    source: str
    unet: ModelHandle
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    # applied while a node uses the UNet, in order, never to the weights other values share (graphflow.models.patches)
    patches: tuple[Any, ...] = ()
    latent_scale: int = 8  # pixels per latent of the checkpoint's VAE (its 2 ** (blocks - 1))
    compile: Compilation | None = None  # the run's torch.compile choice for the UNet (graphflow.models.compilation)

    def use(self) -> AbstractContextManager[Any]:
        """`with model.use() as unet:` — the UNet on its device with this value's patches applied inside the block,
        compiled when the value says so."""
        from graphflow.models.patches import patched

        return _compiled(patched(self.unet, self.patches, "unet"), self.compile)

    @property
    def in_channels(self) -> int:
        """4 for ordinary UNets, 9 for inpainting UNets (latents + mask + masked-image latents)."""
        return int(self.unet.config.get("in_channels", 4))


@dataclass(frozen=True, eq=False)
class TextEncoders:
    """CLIP: the tokenizer(s) and text encoder(s) of a checkpoint; SDXL has two of each."""

    family: Family
    source: str
    tokenizers: tuple[Any, ...] = field(repr=False)
    encoders: tuple[ModelHandle, ...]
    # SDXL pipelines use zero embeddings, not the encoded "", for an empty negative prompt
    force_zeros_for_empty_prompt: bool = False
    patches: tuple[Any, ...] = ()  # applied while a node uses an encoder, like DiffusionModel.patches
    compile: Compilation | None = None  # the run's torch.compile choice for the text encoders

    def use(self, index: int) -> AbstractContextManager[Any]:
        """`with clip.use(i) as encoder:` — text encoder `i` on its device, with this value's patches applied,
        compiled when the value says so."""
        from graphflow.models.patches import patched

        role = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
        return _compiled(patched(self.encoders[index], self.patches, role), self.compile)


@dataclass(frozen=True, eq=False)
class Autoencoder:
    """VAE: the image <-> latent autoencoder."""

    family: Family | None
    source: str
    vae: ModelHandle

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.get("scaling_factor", 0.18215))

    # the family whose pipelines' precision rules apply when the latents do not say (a VAE loaded on its own: its
    # scaling factor's family, a guess that never refuses anything)
    precision_family: Family | None = None
    compile: Compilation | None = None  # the run's torch.compile choice for encode and decode

    def compiled(self, module: Any) -> Any:
        """The held VAE `module` as this value runs it: with compiled encode and decode when it says so."""
        return module if self.compile is None else self.compile.wrap_vae(module)

    @property
    def scale(self) -> int:
        """How many pixels one latent covers along each side (8 for SD1.5 and SDXL)."""
        return vae_scale(self.vae.config)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.get("latent_channels", 4))

    @property
    def force_upcast(self) -> bool:
        """True for VAEs that overflow in fp16 (SDXL's original); decode them in fp32. A config.json written before
        diffusers had the flag lacks it, and diffusers then takes AutoencoderKL's default, True: so do we."""
        return bool(self.vae.config.get("force_upcast", True))


@dataclass(frozen=True, eq=False)
class ControlNet:
    """CONTROLNET: a ControlNet model for one family."""

    family: Family
    source: str
    controlnet: ModelHandle
    compile: Compilation | None = None  # the run's torch.compile choice for the ControlNet

    def compiled(self, module: Any) -> Any:
        """The held ControlNet `module` as this value runs it: compiled when it says so."""
        return module if self.compile is None else self.compile.wrap(module)


@contextmanager
def _compiled(held: AbstractContextManager[Any], compilation: Compilation | None) -> Iterator[Any]:
    """The module `held` holds, compiled by `compilation` (a wrapper sharing its weights) when there is one."""
    with held as module:
        yield module if compilation is None else compilation.wrap(module)


def vae_scale(config: dict[str, Any]) -> int:
    """Pixels per latent of a VAE config, as the diffusers pipelines work it out: 2 ** (len(block_out_channels) - 1)."""
    return 2 ** (len(config.get("block_out_channels", (0, 0, 0, 0))) - 1)


def family_of_unet_config(config: dict[str, Any]) -> Family:
    """SDXL UNets and ControlNets add pooled text and time ids ("text_time"); SD1.5 ones do not."""
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"
