"""Model family backends: what sampling with one family of denoisers means.

A backend owns a family's geometry (latent channels and pixels per latent, read from the model's
configs), its prompt encoding for the denoiser (which text tensors the call takes), the denoiser call
itself and the noising maths (how noise is scaled in, how an image is noised to a timestep, how the
model input is scaled). The sampling loop (nodes/denoise.py) asks the backend and never assumes a
family; contributors (ControlNet, T2I-Adapter, IP-Adapter) add keyword arguments to the call and a
guider combines the batch rows.

`UNetBackend` covers the DDPM-style UNet families, SD1.5 and SDXL (`SDXLBackend` adds pooled text
embeddings and size/crop time ids). A flow-matching transformer family (SD3, Flux) is another
backend: its `denoise` calls the transformer with its own arguments (pooled projections, guidance,
packed latents), its noising maths uses the flow-matching scheduler's `scale_noise` and sigmas, and
its geometry includes packing; `register_backend` adds it without touching the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graphflow.errors import NodeInputError

if TYPE_CHECKING:
    import torch

    from graphflow.models.components import DiffusionModel
    from nodes.conditioning import Conditioning
    from nodes.denoise import DenoiserCall


@dataclass(frozen=True)
class Geometry:
    """How latents relate to pixels for one model."""

    channels: int  # latent channels the denoiser predicts (4 for SD1.5 and SDXL)
    scale: int  # pixels per latent along each side (the VAE's 2 ** (blocks - 1): 8 for SD1.5 and SDXL)

    def latent_shape(self, batch: int, width: int, height: int) -> tuple[int, int, int, int]:
        return batch, self.channels, height // self.scale, width // self.scale


@dataclass(frozen=True)
class Prompt:
    """The text side as the denoiser takes it, with the guider's rows stacked (e.g. negative, then positive)."""

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] | None  # extra conditioning (SDXL: pooled text embeddings and time ids)


class UNetBackend:
    """SD1.5-style UNets: epsilon (or v) prediction, DDPM-family schedulers, text hidden states only."""

    family = "sd15"

    def geometry(self, model: DiffusionModel) -> Geometry:
        config = model.unet.config
        channels = int(config.get("out_channels", config.get("in_channels", 4)))
        return Geometry(channels, model.latent_scale)

    def denoiser_channels(self, model: DiffusionModel) -> tuple[int, ...]:
        """The input channel counts the denoiser may take: latents, or latents + mask + masked-image latents."""
        channels = self.geometry(model).channels
        return channels, 2 * channels + 1

    def prompt(self, rows: list[Conditioning], batch: int, width: int, height: int, device: str,
               dtype: torch.dtype) -> Prompt:
        import torch

        from nodes.prompt_weighting import match_lengths

        # rows of different lengths (a chunked long prompt beside a short negative) repeat to one length
        embeds = torch.cat([embed.repeat(batch, 1, 1) for embed in match_lengths(*(row.embeds for row in rows))])
        embeds = embeds.to(device, dtype)
        return Prompt(embeds, self.added(rows, batch, width, height, device, dtype))

    def added(self, rows: list[Conditioning], batch: int, width: int, height: int, device: str,
              dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        return None

    def prompt_rows(self, prompt: Prompt, take: Callable[[torch.Tensor], torch.Tensor]) -> Prompt:
        """The prompt with `take` applied to each tensor's rows (the guider's conditional half, say)."""
        added = None if prompt.added is None else {name: take(value) for name, value in prompt.added.items()}
        return Prompt(take(prompt.embeds), added)

    def denoise(self, module: Any, call: DenoiserCall) -> torch.Tensor:
        """The denoiser's prediction for `call`, with what the contributors added to it."""
        import torch

        extra = dict(call.extra)
        added = call.prompt.added
        more = extra.pop("added_cond_kwargs", None)
        if more:
            added = {**(added or {}), **more}
        sample = torch.cat([call.sample, *call.channels], dim=1) if call.channels else call.sample
        return module(sample, call.timestep, encoder_hidden_states=call.prompt.embeds, added_cond_kwargs=added,
                      return_dict=False, **extra)[0]

    # noising maths: what the DDPM-family schedulers do for UNet pipelines

    def initial(self, scheduler: Any, noise: torch.Tensor) -> torch.Tensor:
        return noise * scheduler.init_noise_sigma

    def add_noise(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        return scheduler.add_noise(latents, noise, timesteps)

    def scale_input(self, scheduler: Any, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_model_input(sample, timestep)


class SDXLBackend(UNetBackend):
    """SDXL UNets: SD1.5's, plus the second encoder's pooled embedding and the size/crop time ids."""

    family = "sdxl"

    def added(self, rows: list[Conditioning], batch: int, width: int, height: int, device: str,
              dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        import torch

        # original size, crop top-left and target size, as the SDXL pipelines pass them by default
        sizes = (height, width, 0, 0, height, width)
        return {"text_embeds": torch.cat([row.pooled.repeat(batch, 1) for row in rows]).to(device, dtype),
                "time_ids": torch.tensor([sizes], dtype=dtype).to(device).repeat(len(rows) * batch, 1)}


_BACKENDS: dict[str, UNetBackend] = {"sd15": UNetBackend(), "sdxl": SDXLBackend()}


def register_backend(family: str, backend: Any) -> None:
    """Make `backend` sample the models of `family` (a plugin's: a MODEL value with that family)."""
    _BACKENDS[family] = backend


def backend_for(model: DiffusionModel) -> UNetBackend:
    backend = _BACKENDS.get(model.family)
    if backend is None:
        raise NodeInputError(f"no sampling backend for the model family {model.family!r} ({model.source}); "
                             f"known: {', '.join(sorted(_BACKENDS))}")
    return backend
