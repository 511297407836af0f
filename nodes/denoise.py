"""The Sampler's denoising loop, step for step what the diffusers ControlNet pipelines do.

Text-to-image follows StableDiffusionControlNetPipeline (and its SDXL sibling), a latent without a
mask StableDiffusionControlNetImg2ImgPipeline, a latent with a mask
StableDiffusionControlNetInpaintPipeline. Every random draw comes from one CPU `torch.Generator`
seeded with the Sampler's seed, in the pipelines' order: the encoded image's latent sample (when
the pipeline draws one), the noise, the masked image's latent sample (inpainting), then the
scheduler's own draws. So the same seed gives the same pixels as the pipeline called with
`generator=torch.Generator("cpu").manual_seed(seed)`, on any device.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from graphflow.models.components import DiffusionModel
from graphflow.models.devices import torch_dtype
from nodes.conditioning import ControlApplication
from nodes.latents import LATENT_SCALE, binary_mask, sample_encoded
from nodes.schedulers import make_scheduler

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SamplingRequest:
    """What the Sampler was asked for; `width` and `height` are the resolved output size in pixels."""

    model: DiffusionModel
    positive: dict[str, Any]
    negative: dict[str, Any] | None
    controls: tuple[ControlApplication, ...]
    latent: dict[str, Any] | None  # None or an EmptyLatent: text-to-image
    mask: torch.Tensor | None  # MASK [B, H, W]; with a latent: inpainting
    seed: int
    steps: int
    cfg: float
    scheduler: str
    strength: float
    guess_mode: bool
    batch: int
    width: int
    height: int


@dataclass(frozen=True)
class Prompt:
    """The text side as the UNet sees it: negative rows then positive rows when guidance is on."""

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] | None  # SDXL: pooled text embeddings and size/crop time ids
    cfg: float
    guided: bool

    def cond_half(self) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        if not self.guided:
            return self.embeds, self.added
        added = None if self.added is None else {name: value.chunk(2)[1] for name, value in self.added.items()}
        return self.embeds.chunk(2)[1], added


@dataclass(frozen=True)
class Inpainting:
    """What inpainting adds to each step: the mask at latent size and what it keeps."""

    mask: torch.Tensor  # [B, 1, h, w], 1 = repaint
    masked_latents: torch.Tensor | None  # 9-channel UNets: the masked image, encoded; rows as in Prompt
    image_latents: torch.Tensor | None  # 4-channel UNets: the clean image, re-noised and kept outside the mask
    noise: torch.Tensor


def sample(ctx: RunContext, request: SamplingRequest) -> torch.Tensor:
    """Denoised latents [B, 4, H/8, W/8] for `request`, reporting each step through `ctx.progress`."""
    import torch

    model = request.model
    device, dtype = model.unet.key.device, torch_dtype(model.unet.key.dtype)
    # ControlNets trained with pooled conditions always run in guess mode; the pipelines ask the first one
    first = request.controls[0].controlnet.controlnet.config if request.controls else {}
    guess_mode = request.guess_mode or bool(first.get("global_pool_conditions", False))
    prompt = _prompt(request, device, dtype)
    images = [_control_image(c, request, device, prompt.guided and not guess_mode) for c in request.controls]
    scheduler = make_scheduler(request.scheduler, model.scheduler_config)
    generator = torch.Generator("cpu").manual_seed(request.seed)
    with torch.no_grad():
        timesteps, latents, inpainting = _start(request, scheduler, generator, device, dtype, prompt.guided)
        with ExitStack() as held:
            unet = held.enter_context(model.use())
            nets = [held.enter_context(c.controlnet.controlnet.use()) for c in request.controls]
            loop = _Loop(unet, list(zip(nets, images, request.controls, strict=True)), prompt, scheduler,
                         inpainting, guess_mode)
            return loop.run(ctx, latents, timesteps, _step_arguments(scheduler, generator))


def _prompt(request: SamplingRequest, device: str, dtype: torch.dtype) -> Prompt:
    import torch

    guided = request.cfg > 1.0
    negative = request.positive["default_negative"] if request.negative is None else request.negative
    rows = [negative, request.positive] if guided else [request.positive]
    embeds = torch.cat([row["embeds"].repeat(request.batch, 1, 1) for row in rows]).to(device, dtype)
    added = None
    if request.model.family == "sdxl":
        # original size, crop top-left and target size, as the SDXL pipelines pass them by default
        sizes = (request.height, request.width, 0, 0, request.height, request.width)
        added = {"text_embeds": torch.cat([row["pooled"].repeat(request.batch, 1) for row in rows]).to(device, dtype),
                 "time_ids": torch.tensor([sizes], dtype=dtype).to(device).repeat(len(rows) * request.batch, 1)}
    return Prompt(embeds, added, float(request.cfg), guided)


def _control_image(control: ControlApplication, request: SamplingRequest, device: str,
                   duplicate: bool) -> torch.Tensor:
    """The control image as the pipelines' prepare_image leaves it: [B (x2), 3, H, W] in 0..1 on the device."""
    import torch

    image = control.image
    if image.shape[1:3] != (request.height, request.width):
        image = _resize_like_diffusers(image, request.width, request.height)
    if image.shape[0] not in (1, request.batch):
        raise NodeInputError(f"a control image batch has {image.shape[0]} images for {request.batch} latents; "
                             "give 1 control image or one per latent")
    pixels = image.to("cpu", torch.float32).permute(0, 3, 1, 2)
    pixels = pixels.repeat_interleave(request.batch // pixels.shape[0], dim=0)
    pixels = pixels.to(device, torch_dtype(control.controlnet.controlnet.key.dtype))
    return torch.cat([pixels] * 2) if duplicate else pixels


def _resize_like_diffusers(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The pipelines' control image resize: 8-bit RGB through PIL's Lanczos filter."""
    import numpy as np
    from PIL import Image

    from nodes.imaging import from_uint8, to_uint8

    resized = [np.asarray(Image.fromarray(item).resize((width, height), Image.Resampling.LANCZOS))
               for item in to_uint8(image)]
    return from_uint8(np.stack(resized))


def _start(request: SamplingRequest, scheduler: Any, generator: torch.Generator, device: str, dtype: torch.dtype,
           guided: bool) -> tuple[torch.Tensor, torch.Tensor, Inpainting | None]:
    """(timesteps, initial latents, inpainting) for text-to-image, img2img or inpainting."""
    from diffusers.utils.torch_utils import randn_tensor

    latent = request.latent
    shape = (request.batch, 4, request.height // LATENT_SCALE, request.width // LATENT_SCALE)
    if latent is None or latent.get("empty"):
        scheduler.set_timesteps(request.steps, device=device)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return scheduler.timesteps, noise * scheduler.init_noise_sigma, None
    timesteps = _partial_schedule(scheduler, request.steps, request.strength, device)
    first = timesteps[:1].repeat(request.batch)
    mask = request.mask if request.mask is not None else latent.get("mask")
    if mask is None:
        image_latents = sample_encoded(latent, generator, device, dtype)
        noise = randn_tensor(image_latents.shape, generator=generator, device=device, dtype=dtype)
        return timesteps, scheduler.add_noise(image_latents, noise, first), None
    return timesteps, *_inpainting_start(request, latent, mask, scheduler, generator, first, shape, device, dtype,
                                         guided)


def _partial_schedule(scheduler: Any, steps: int, strength: float, device: str) -> torch.Tensor:
    """The last `strength` of the schedule, as the img2img and inpainting pipelines' get_timesteps cut it."""
    scheduler.set_timesteps(steps, device=device)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if len(timesteps) == 0:
        raise NodeInputError(f"strength {strength} of {steps} steps leaves no step to run; raise strength or steps "
                             f"(at least 1/{steps})")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps


def _inpainting_start(request: SamplingRequest, latent: dict[str, Any], mask: torch.Tensor, scheduler: Any,
                      generator: torch.Generator, first: torch.Tensor, shape: tuple[int, ...], device: str,
                      dtype: torch.dtype, guided: bool) -> tuple[torch.Tensor, Inpainting]:
    """(initial latents, inpainting) as StableDiffusionControlNetInpaintPipeline's prepare_latents and
    prepare_mask_latents make them, drawing from the generator in their order."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    nine_channels = request.model.in_channels == 9
    full_strength = request.strength == 1.0
    image_latents = None
    if not nine_channels or not full_strength:
        image_latents = sample_encoded(latent, generator, device, dtype)
        image_latents = image_latents.repeat(request.batch // image_latents.shape[0], 1, 1, 1)
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    # at full strength the inpainting pipeline starts from pure noise (img2img's would still add the image)
    latents = noise * scheduler.init_noise_sigma if full_strength else scheduler.add_noise(image_latents, noise, first)
    masked_latents = _masked_image_latents(latent, generator, device, dtype, request.batch)
    small_mask = torch.nn.functional.interpolate(binary_mask(mask), size=shape[2:]).to(device, dtype)
    small_mask = small_mask.repeat(request.batch // small_mask.shape[0], 1, 1, 1)
    if nine_channels:
        masked_latents = torch.cat([masked_latents] * 2) if guided else masked_latents
        return latents, Inpainting(small_mask, masked_latents.to(device, dtype), None, noise)
    return latents, Inpainting(small_mask, None, image_latents, noise)


def _masked_image_latents(latent: dict[str, Any], generator: torch.Generator, device: str, dtype: torch.dtype,
                          batch: int) -> torch.Tensor | None:
    """The masked image's latents; the pipelines draw them (for 9- and 4-channel UNets alike), so draw here too."""
    import torch

    masked = latent.get("masked_moments")
    if masked is not None:
        encoded = sample_encoded({"moments": masked, "scaling_factor": latent["scaling_factor"]}, generator, device,
                                 dtype)
        return encoded.repeat(batch // encoded.shape[0], 1, 1, 1)
    moments = latent.get("moments")
    if moments is not None:  # 4-channel UNets never look at them, but the draw moves the generator on
        torch.randn(moments[:, : moments.shape[1] // 2].shape, generator=generator, dtype=moments.dtype)
    return None


def _step_arguments(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    """eta=0 for DDIM and the generator for schedulers that draw noise, as the pipelines pass them."""
    accepted = inspect.signature(scheduler.step).parameters
    return ({"eta": 0.0} if "eta" in accepted else {}) | ({"generator": generator} if "generator" in accepted else {})


@dataclass
class _Loop:
    """One denoising run: the held UNet and ControlNets, the prompt, the scheduler and inpainting state."""

    unet: Any
    controls: list[tuple[Any, torch.Tensor, ControlApplication]]
    prompt: Prompt
    scheduler: Any
    inpainting: Inpainting | None
    guess_mode: bool

    def run(self, ctx: RunContext, latents: torch.Tensor, timesteps: torch.Tensor,
            step_arguments: dict[str, Any]) -> torch.Tensor:
        total = len(timesteps)
        for index, timestep in enumerate(timesteps):
            noise = self.predict_noise(latents, timestep, index, total)
            latents = self.scheduler.step(noise, timestep, latents, **step_arguments, return_dict=False)[0]
            latents = self.keep_unmasked(latents, timesteps, index)
            ctx.progress(index + 1, total)
        return latents

    def predict_noise(self, latents: torch.Tensor, timestep: torch.Tensor, index: int, total: int) -> torch.Tensor:
        import torch

        prompt = self.prompt
        model_input = torch.cat([latents] * 2) if prompt.guided else latents
        model_input = self.scheduler.scale_model_input(model_input, timestep)
        down, mid = self.control_residuals(model_input, latents, timestep, index, total)
        if self.inpainting is not None and self.inpainting.masked_latents is not None:
            mask = torch.cat([self.inpainting.mask] * 2) if prompt.guided else self.inpainting.mask
            model_input = torch.cat([model_input, mask, self.inpainting.masked_latents], dim=1)
        noise = self.unet(model_input, timestep, encoder_hidden_states=prompt.embeds,
                          down_block_additional_residuals=down, mid_block_additional_residual=mid,
                          added_cond_kwargs=prompt.added, return_dict=False)[0]
        if not prompt.guided:
            return noise
        uncond, cond = noise.chunk(2)
        return uncond + prompt.cfg * (cond - uncond)

    def control_residuals(self, model_input: torch.Tensor, latents: torch.Tensor, timestep: torch.Tensor,
                          index: int, total: int) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        """The ControlNets' residuals summed in list order; one outside its window (scale 0) adds nothing."""
        import torch

        active = [(net, image, scale) for net, image, control in self.controls
                  if (scale := control.scale * control.keep(index, total)) != 0]
        if not active:
            return None, None
        zero_pad = self.guess_mode and self.prompt.guided  # guess mode: the ControlNets see the positive rows only
        embeds, added = self.prompt.cond_half() if zero_pad else (self.prompt.embeds, self.prompt.added)
        control_input = self.scheduler.scale_model_input(latents, timestep) if zero_pad else model_input
        down, mid = None, None
        for net, image, scale in active:
            net_down, net_mid = net(control_input, timestep, encoder_hidden_states=embeds, controlnet_cond=image,
                                    conditioning_scale=scale, guess_mode=self.guess_mode, added_cond_kwargs=added,
                                    return_dict=False)
            down = net_down if down is None else [a + b for a, b in zip(down, net_down, strict=True)]
            mid = net_mid if mid is None else mid + net_mid
        if zero_pad:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return down, mid

    def keep_unmasked(self, latents: torch.Tensor, timesteps: torch.Tensor, index: int) -> torch.Tensor:
        """4-channel inpainting: outside the mask, put back the image noised to the next step's level."""
        import torch

        inpainting = self.inpainting
        if inpainting is None or inpainting.image_latents is None:
            return latents
        kept = inpainting.image_latents
        if index < len(timesteps) - 1:
            kept = self.scheduler.add_noise(kept, inpainting.noise, torch.tensor([timesteps[index + 1]]))
        return (1 - inpainting.mask) * kept + inpainting.mask * latents
