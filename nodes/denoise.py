"""The Sampler's denoising loop, step for step what the diffusers pipelines do, open to every family.

The loop is family-agnostic. It asks the model's *backend* (nodes/backends.py) for the geometry, the
prompt tensors, the denoiser call and the noising maths; *contributors* add to each denoiser call
(the ControlNets' residuals; T2I-Adapter and IP-Adapter add theirs the same way) and may change the
latents after each step (4-channel inpainting puts the kept image back); a *guider* (classifier-free
guidance) decides the batch rows and combines the predictions.

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from graphflow.models.components import DiffusionModel
from graphflow.models.devices import torch_dtype
from graphflow.models.memory import memory_options, sliced_attention
from nodes.backends import Geometry, Prompt, UNetBackend, backend_for
from nodes.conditioning import Conditioning, ControlApplication
from nodes.controlnets import ControlNets
from nodes.latents import Latent, binary_mask, sample_encoded
from nodes.schedulers import make_scheduler

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SamplingRequest:
    """What the Sampler was asked for; `width` and `height` are the resolved output size in pixels."""

    model: DiffusionModel
    positive: Conditioning
    negative: Conditioning | None
    controls: tuple[ControlApplication, ...]
    latent: Latent | None  # None or an EmptyLatent: text-to-image
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
    # more contributors to each denoiser call (adapters), after the ControlNets, in order
    contributors: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Guider:
    """Classifier-free guidance: the negative and positive rows through the denoiser in one batch, the
    prediction moved `scale` times the way the positive pulls from the negative. 1 or less: no guidance."""

    scale: float

    @property
    def guided(self) -> bool:
        return self.scale > 1.0

    def rows(self, positive: Conditioning, negative: Conditioning) -> list[Conditioning]:
        return [negative, positive] if self.guided else [positive]

    def batch(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` once per row."""
        import torch

        return torch.cat([tensor] * 2) if self.guided else tensor

    def conditional(self, tensor: torch.Tensor) -> torch.Tensor:
        """The positive rows of a batched `tensor`."""
        return tensor.chunk(2)[1] if self.guided else tensor

    def zero_unconditional(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch from the positive rows' `tensor`, zeros for the negative rows."""
        import torch

        return torch.cat([torch.zeros_like(tensor), tensor]) if self.guided else tensor

    def combine(self, prediction: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return prediction
        uncond, cond = prediction.chunk(2)
        return uncond + self.scale * (cond - uncond)


@dataclass
class DenoiserCall:
    """One call of the denoiser at one step, as the contributors see and extend it."""

    sample: torch.Tensor  # the scaled model input, one copy per guider row
    latents: torch.Tensor  # the latents being denoised (one copy)
    timestep: torch.Tensor
    index: int  # step index in the schedule being run, and the number of its steps
    total: int
    prompt: Prompt
    extra: dict[str, Any] = field(default_factory=dict)  # keyword arguments contributors add to the call
    channels: list[torch.Tensor] = field(default_factory=list)  # inputs stacked onto `sample` along channels


@dataclass
class Session:
    """What a sampling run shares with its contributors: set up before the first step."""

    request: SamplingRequest
    backend: UNetBackend
    geometry: Geometry
    guider: Guider
    prompt: Prompt
    scheduler: Any
    device: str
    dtype: torch.dtype
    attention_slicing: str | int | None = None  # the run's option: the held UNet and ControlNets slice attention
    swap_controlnets: bool = False  # the run's option: each ControlNet held only inside its window
    denoiser: Any = None  # the held denoiser module (patches applied), set before the contributors hold theirs

    @property
    def steps_run(self) -> int:
        """The steps the pipelines count fractions of the schedule against (their num_inference_steps after
        strength): all of them for text-to-image, the last floor(strength * steps) when starting from an image.
        `DenoiserCall.total` counts denoiser calls instead (steps + 1 for PNDM, 2 per step for Heun)."""
        latent = self.request.latent
        if latent is None or latent.empty:
            return self.request.steps
        return min(int(self.request.steps * self.request.strength), self.request.steps)


class Contributor(Protocol):
    """Adds to every denoiser call (residuals, extra conditioning); may change the latents after a step."""

    def hold(self, held: ExitStack, session: Session) -> None:
        """Enter the models it needs (`held.enter_context(handle.use())`; the denoiser is `session.denoiser`,
        held already) and prepare its inputs; `held.callback` undoes what it changes on a shared module."""

    def contribute(self, call: DenoiserCall) -> None:
        """Add to `call.extra` / `call.channels` for this step."""

    def after_step(self, latents: torch.Tensor, timesteps: torch.Tensor, index: int) -> torch.Tensor:
        """The latents after step `index` (most contributors return them as they are)."""


def sample(ctx: RunContext, request: SamplingRequest, part: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Denoised latents [B, C, H/scale, W/scale] for `request`, reporting each step through `ctx.progress`; `part`
    (i, n): this is the i-th of n samplings of one node, and reports its steps as that share of the whole."""
    import torch

    model = request.model
    backend = backend_for(model)
    device, dtype = model.unet.key.device, torch_dtype(model.unet.key.dtype)
    guider = Guider(float(request.cfg))
    negative = request.positive.default_negative if request.negative is None else request.negative
    prompt = backend.prompt(guider.rows(request.positive, negative), request.batch, request.width, request.height,
                            device, dtype)
    scheduler = make_scheduler(request.scheduler, model.scheduler_config)
    memory = memory_options(ctx.options)
    session = Session(request, backend, backend.geometry(model), guider, prompt, scheduler, device, dtype,
                      memory.attention_slicing, memory.swap_controlnets)
    contributors: list[Any] = [ControlNets(request.controls)] if request.controls else []
    contributors.extend(request.contributors)
    generator = torch.Generator("cpu").manual_seed(request.seed)
    with torch.no_grad():
        timesteps, latents, inpainting = _start(session, generator)
        if inpainting is not None:
            contributors.append(inpainting)
        with ExitStack() as held:
            denoiser = held.enter_context(sliced_attention(held.enter_context(model.use()), session.attention_slicing))
            session.denoiser = denoiser
            for contributor in contributors:
                contributor.hold(held, session)
            loop = _Loop(session, denoiser, contributors)
            return loop.run(ctx, latents, timesteps, _step_arguments(scheduler, generator), part)


def _start(session: Session, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, Inpainting | None]:
    """(timesteps, initial latents, inpainting) for text-to-image, img2img or inpainting."""
    from diffusers.utils.torch_utils import randn_tensor

    request, scheduler, backend = session.request, session.scheduler, session.backend
    device, dtype = session.device, session.dtype
    latent = request.latent
    shape = session.geometry.latent_shape(request.batch, request.width, request.height)
    if latent is None or latent.empty:
        scheduler.set_timesteps(request.steps, device=device)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return scheduler.timesteps, backend.initial(scheduler, noise), None
    timesteps = _partial_schedule(scheduler, request.steps, request.strength, device)
    first = timesteps[:1].repeat(request.batch)
    mask = request.mask if request.mask is not None else latent.mask
    if mask is None:
        image_latents = sample_encoded(latent, generator, device, dtype)
        noise = randn_tensor(image_latents.shape, generator=generator, device=device, dtype=dtype)
        return timesteps, backend.add_noise(scheduler, image_latents, noise, first), None
    return timesteps, *_inpainting_start(session, latent, mask, generator, first, shape)


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


@dataclass
class Inpainting:
    """What inpainting adds to each step: the mask at latent size and what it keeps. With a 9-channel UNet the
    mask and the masked image's latents are stacked onto the denoiser's input; with an ordinary one the image,
    noised to the next step's level, is put back outside the mask after each step."""

    mask: torch.Tensor  # [B, 1, h, w], 1 = repaint
    masked_latents: torch.Tensor | None  # 9-channel UNets: the masked image, encoded; one copy per guider row
    image_latents: torch.Tensor | None  # 4-channel UNets: the clean image, re-noised and kept outside the mask
    noise: torch.Tensor
    session: Session | None = None

    def hold(self, held: ExitStack, session: Session) -> None:
        self.session = session

    def contribute(self, call: DenoiserCall) -> None:
        if self.masked_latents is not None:
            call.channels.extend((self.session.guider.batch(self.mask), self.masked_latents))

    def after_step(self, latents: torch.Tensor, timesteps: torch.Tensor, index: int) -> torch.Tensor:
        import torch

        if self.image_latents is None:
            return latents
        kept = self.image_latents
        if index < len(timesteps) - 1:
            kept = self.session.backend.add_noise(self.session.scheduler, kept, self.noise,
                                                  torch.tensor([timesteps[index + 1]]))
        return (1 - self.mask) * kept + self.mask * latents


def _inpainting_start(session: Session, latent: Latent, mask: torch.Tensor, generator: torch.Generator,
                      first: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, Inpainting]:
    """(initial latents, inpainting) as StableDiffusionControlNetInpaintPipeline's prepare_latents and
    prepare_mask_latents make them, drawing from the generator in their order."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    request, scheduler, backend = session.request, session.scheduler, session.backend
    device, dtype = session.device, session.dtype
    nine_channels = request.model.in_channels != session.geometry.channels
    full_strength = request.strength == 1.0
    image_latents = None
    if not nine_channels or not full_strength:
        image_latents = sample_encoded(latent, generator, device, dtype)
        image_latents = image_latents.repeat(request.batch // image_latents.shape[0], 1, 1, 1)
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    # at full strength the inpainting pipeline starts from pure noise (img2img's would still add the image)
    latents = (backend.initial(scheduler, noise) if full_strength
               else backend.add_noise(scheduler, image_latents, noise, first))
    masked_latents = _masked_image_latents(latent, generator, device, dtype, request.batch)
    small_mask = torch.nn.functional.interpolate(binary_mask(mask), size=shape[2:]).to(device, dtype)
    small_mask = small_mask.repeat(request.batch // small_mask.shape[0], 1, 1, 1)
    if nine_channels:
        return latents, Inpainting(small_mask, session.guider.batch(masked_latents).to(device, dtype), None, noise)
    return latents, Inpainting(small_mask, None, image_latents, noise)


def _masked_image_latents(latent: Latent, generator: torch.Generator, device: str, dtype: torch.dtype,
                          batch: int) -> torch.Tensor | None:
    """The masked image's latents; the pipelines draw them (for 9- and 4-channel UNets alike), so draw here too."""
    import torch

    if latent.masked_moments is not None:
        encoded = sample_encoded(latent, generator, device, dtype, latent.masked_moments)
        return encoded.repeat(batch // encoded.shape[0], 1, 1, 1)
    moments = latent.moments
    if moments is not None:  # 4-channel UNets never look at them, but the draw moves the generator on
        torch.randn(moments[:, : moments.shape[1] // 2].shape, generator=generator, dtype=moments.dtype)
    return None


def _step_arguments(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    """eta=0 for DDIM and the generator for schedulers that draw noise, as the pipelines pass them."""
    accepted = inspect.signature(scheduler.step).parameters
    return ({"eta": 0.0} if "eta" in accepted else {}) | ({"generator": generator} if "generator" in accepted else {})


@dataclass
class _Loop:
    """One denoising run: the held denoiser, the contributors and the session."""

    session: Session
    denoiser: Any
    contributors: list[Any]

    def run(self, ctx: RunContext, latents: torch.Tensor, timesteps: torch.Tensor, step_arguments: dict[str, Any],
            part: tuple[int, int] = (0, 1)) -> torch.Tensor:
        scheduler = self.session.scheduler
        total = len(timesteps)
        # progress counts the steps that run (after img2img's strength cut them), not denoiser calls: Heun makes
        # two calls a step, PNDM one more in all; one bar spans every `part` of a seed list
        steps = self.session.steps_run
        done, parts, reported = part[0] * steps, part[1] * steps, 0
        for index, timestep in enumerate(timesteps):
            noise = self.predict_noise(latents, timestep, index, total)
            latents = scheduler.step(noise, timestep, latents, **step_arguments, return_dict=False)[0]
            for contributor in self.contributors:
                latents = contributor.after_step(latents, timesteps, index)
            finished = (index + 1) * steps // total
            if finished > reported:
                reported = finished
                ctx.progress(done + finished, parts)
            else:
                ctx.check_cancelled()
        return latents

    def predict_noise(self, latents: torch.Tensor, timestep: torch.Tensor, index: int, total: int) -> torch.Tensor:
        session = self.session
        model_input = session.backend.scale_input(session.scheduler, session.guider.batch(latents), timestep)
        call = DenoiserCall(model_input, latents, timestep, index, total, session.prompt)
        for contributor in self.contributors:
            contributor.contribute(call)
        return session.guider.combine(session.backend.denoise(self.denoiser, call))
