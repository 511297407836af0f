"""The ControlNets of a sampling run, as a contributor to each denoiser call: their residuals summed in list
order, each only inside its guidance window, exactly as the diffusers ControlNet pipelines add them (guess mode
too). With the memory option `swap_controlnets` each ControlNet is held only over the steps it guides.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from graphflow.errors import NodeInputError
from graphflow.models.components import ControlNet
from graphflow.models.devices import torch_dtype
from graphflow.models.memory import hold_sliced, sliced_attention
from nodes.conditioning import ControlApplication
from nodes.imaging import resize_like_pil

if TYPE_CHECKING:
    import torch

    from nodes.denoise import DenoiserCall, SamplingRequest, Session


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
        self.images = [_control_image(control, request, duplicate) for control in self.controls]
        self.windows: list[_WindowHeld] = []  # swap_controlnets: one holder per ControlNet, over all its uses
        if session.swap_controlnets:
            holders: dict[int, _WindowHeld] = {}
            self.nets: list[Any] = []
            for control in self.controls:
                holder = holders.get(id(control.controlnet.controlnet))
                if holder is None:
                    holder = holders[id(control.controlnet.controlnet)] = _WindowHeld(
                        control.controlnet, session.attention_slicing, held)
                    self.windows.append(holder)
                holder.controls.append(control)
                self.nets.append(holder)
        else:  # each held alone for the whole loop: attention slicing changes the module other graphs share
            nets = hold_sliced(held, [control.controlnet.controlnet for control in self.controls],
                               session.attention_slicing)
            self.nets = [control.controlnet.compiled(net) for net, control in zip(nets, self.controls, strict=True)]

    def contribute(self, call: DenoiserCall) -> None:
        for window in self.windows:
            window.follow(call.index, call.total)
        active = [(net, image, scale) for net, image, control in zip(self.nets, self.images, self.controls, strict=True)
                  if (scale := control.scale * control.keep(call.index, call.total)) != 0]
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
        self.runner: Any = None  # the module as the ControlNet value runs it (compiled or not), made once per window
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
            self.window, self.runner = None, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from graphflow.models.memory import exclusive

        with exclusive(self.handle) as module, sliced_attention(module, self.slice_size) as net:
            if self.runner is None:  # a torch.compile wrapper costs milliseconds to make: not one per call
                self.runner = self.controlnet.compiled(net)
            return self.runner(*args, **kwargs)


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
