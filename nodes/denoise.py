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
from graphflow.models.components import ControlNet, DiffusionModel
from graphflow.models.devices import torch_dtype
from graphflow.models.memory import hold_sliced, memory_options, sliced_attention
from nodes.backends import Geometry, Prompt, UNetBackend, backend_for
from nodes.conditioning import Conditioning, ControlApplication
from nodes.imaging import resize_like_pil
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


class ControlNets:
    """The ControlNets of a request: their residuals summed in list order, each only inside its window."""

    def __init__(self, controls: tuple[ControlApplication, ...]) -> None:
        self.controls = controls
        # ControlNets trained with pooled conditions always run in guess mode; the pipelines ask the first one
        self.first_config = controls[0].controlnet.controlnet.config if controls else {}

    def hold(self, held: ExitStack, session: Session) -> None:
        request = session.request
        self.guess_mode = request.guess_mode or bool(self.first_config.get("global_pool_conditions", False))
        self.session = session
        duplicate = session.guider.guided and not self.guess_mode
        images = [_control_image(control, request, duplicate) for control in self.controls]
        handles = [control.controlnet.controlnet for control in self.controls]
        if session.swap_controlnets:  # one holder per ControlNet, over the steps of all its uses
            windows: dict[int, _WindowHeld] = {}
            for control in self.controls:
                key = id(control.controlnet.controlnet)
                if key not in windows:
                    windows[key] = _WindowHeld(control.controlnet, session.attention_slicing, held)
                windows[key].controls.append(control)
            self.windows = list(windows.values())
            self.nets: list[Any] = [windows[id(control.controlnet.controlnet)] for control in self.controls]
        else:  # each held alone for the whole loop: attention slicing changes the module other graphs share
            nets = hold_sliced(held, handles, session.attention_slicing)
            self.nets = [control.controlnet.compiled(net) for net, control in zip(nets, self.controls, strict=True)]
        self.active = list(zip(self.nets, images, self.controls, strict=True))

    def contribute(self, call: DenoiserCall) -> None:
        scales = [control.scale * control.keep(call.index, call.total) for control in self.controls]
        if self.session.swap_controlnets:
            for window in self.windows:
                window.follow(call.index, call.total)
        active = [(net, image, scale) for (net, image, _), scale in zip(self.active, scales, strict=True)
                  if scale != 0]
        if not active:
            call.extra.update(down_block_additional_residuals=None, mid_block_additional_residual=None)
            return
        session = self.session
        guider, backend = session.guider, session.backend
        zero_pad = self.guess_mode and guider.guided  # guess mode: the ControlNets see the positive rows only
        prompt = backend.prompt_rows(call.prompt, guider.conditional) if zero_pad else call.prompt
        control_input = backend.scale_input(session.scheduler, call.latents, call.timestep) if zero_pad else call.sample
        down, mid = None, None
        for net, image, scale in active:
            net_down, net_mid = net(control_input, call.timestep, encoder_hidden_states=prompt.embeds,
                                    controlnet_cond=image, conditioning_scale=scale, guess_mode=self.guess_mode,
                                    added_cond_kwargs=prompt.added, return_dict=False)
            down = net_down if down is None else [a + b for a, b in zip(down, net_down, strict=True)]
            mid = net_mid if mid is None else mid + net_mid
        if self.session.swap_controlnets:
            for window in self.windows:
                window.finish(call.index)
        if zero_pad:
            down = [guider.zero_unconditional(d) for d in down]
            mid = guider.zero_unconditional(mid)
        call.extra.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)

    def after_step(self, latents: torch.Tensor, timesteps: torch.Tensor, index: int) -> torch.Tensor:
        return latents


class _WindowHeld:
    """A ControlNet held only over the steps of its windows (memory option `swap_controlnets`; the ControlNet may
    be used several times in the control list, `controls`): loaded and put on the device at the first step any of
    them guides, off the device after the last. Each call holds the module alone just while it runs, so a run
    waiting for one never holds another ControlNet meanwhile (no circular waits between runs)."""

    def __init__(self, controlnet: ControlNet, slice_size: str | int | None, loop: ExitStack) -> None:
        self.controlnet, self.handle, self.slice_size = controlnet, controlnet.controlnet, slice_size
        self.controls: list[ControlApplication] = []
        self.window: ExitStack | None = None
        self.steps: tuple[int, int] | None = None  # first and last step with a non-zero scale
        loop.callback(self.release)  # an error or a cancel between steps lets go too

    def follow(self, index: int, total: int) -> None:
        """Hold the ControlNet from the first step of its windows (before the call of step `index`)."""
        if self.steps is None:
            active = [step for step in range(total)
                      if any(control.scale * control.keep(step, total) != 0 for control in self.controls)]
            self.steps = (active[0], active[-1]) if active else (total, -1)
        first, last = self.steps
        if first <= index <= last and self.window is None:
            self.window = ExitStack()
            self.window.enter_context(self.handle.use(offload_after=True))

    def finish(self, index: int) -> None:
        """After the call of step `index`: let go when it was the window's last."""
        if self.steps is not None and index >= self.steps[1]:
            self.release()

    def release(self) -> None:
        if self.window is not None:
            self.window.close()
            self.window = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from graphflow.models.memory import exclusive

        with exclusive(self.handle) as module, sliced_attention(module, self.slice_size) as net:
            return self.controlnet.compiled(net)(*args, **kwargs)


def _control_image(control: ControlApplication, request: SamplingRequest, duplicate: bool) -> torch.Tensor:
    """The control image as the pipelines' prepare_image leaves it: [B (x2), 3, H, W] in 0..1 on the device."""
    import torch

    image = control.image
    if image.shape[1:3] != (request.height, request.width):
        image = resize_like_pil(image, request.width, request.height)
    if image.shape[0] not in (1, request.batch):
        raise NodeInputError(f"a control image batch has {image.shape[0]} images for {request.batch} latents; "
                             "give 1 control image or one per latent")
    handle = control.controlnet.controlnet
    pixels = image.to("cpu", torch.float32).permute(0, 3, 1, 2)
    pixels = pixels.repeat_interleave(request.batch // pixels.shape[0], dim=0)
    pixels = pixels.to(handle.key.device, torch_dtype(handle.key.dtype))
    return torch.cat([pixels] * 2) if duplicate else pixels


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
        done, parts = part[0] * total, part[1] * total
        for index, timestep in enumerate(timesteps):
            noise = self.predict_noise(latents, timestep, index, total)
            latents = scheduler.step(noise, timestep, latents, **step_arguments, return_dict=False)[0]
            for contributor in self.contributors:
                latents = contributor.after_step(latents, timesteps, index)
            ctx.progress(done + index + 1, parts)
        return latents

    def predict_noise(self, latents: torch.Tensor, timestep: torch.Tensor, index: int, total: int) -> torch.Tensor:
        session = self.session
        model_input = session.backend.scale_input(session.scheduler, session.guider.batch(latents), timestep)
        call = DenoiserCall(model_input, latents, timestep, index, total, session.prompt)
        for contributor in self.contributors:
            contributor.contribute(call)
        return session.guider.combine(session.backend.denoise(self.denoiser, call))
