"""T2I-Adapter: T2IAdapterLoader, T2IAdapterApply, and the contributor that adds the adapters' features to each
denoiser call.

A T2I-Adapter turns a control image into one feature map per UNet down block; the UNet adds them inside its down
blocks (`down_intrablock_additional_residuals`), beside whatever ControlNets add to the skip connections. The
features are computed once per run, as StableDiffusionAdapterPipeline and StableDiffusionXLAdapterPipeline do:
the image resized like theirs, `adapter(image)` times the scale (several adapters: a weighted sum, as diffusers'
MultiAdapter makes it), repeated for the batch and once per guider row; each step takes a fresh copy (the UNet
pops from the list) while the step index is below int(steps * conditioning_factor).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graphflow import types
from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from graphflow.models.components import FAMILY_NAMES, Family
from graphflow.models.manager import ModelHandle
from graphflow.node import Input, Node, Output
from graphflow.types import FLOAT, IMAGE, STRING
from nodes.models import _load

if TYPE_CHECKING:
    import torch

    from nodes.denoise import DenoiserCall, SamplingRequest, Session

T2I_ADAPTER = types.register("T2I_ADAPTER", "a T2I-Adapter held by the model manager")
ADAPTER = types.register("ADAPTER", "one adapter application for the Sampler's adapters list (T2IAdapterApply)")


@dataclass(frozen=True, eq=False)
class T2IAdapterModel:
    """T2I_ADAPTER: a T2I-Adapter for one family (SDXL's are diffusers' "full_adapter_xl" type)."""

    family: Family
    source: str
    adapter: ModelHandle


@dataclass(frozen=True, eq=False)
class T2IAdapterApplication:
    """ADAPTER: a T2I-Adapter applied with its image, scale and the fraction of the steps it is active for."""

    adapter: T2IAdapterModel
    image: torch.Tensor  # IMAGE [B, H, W, 3] in 0..1
    scale: float
    conditioning_factor: float

    def active(self, step: int, steps: int) -> bool:
        """Whether the denoiser call at index `step` of a run of `steps` steps takes the features: every call at
        factor 1, as the SD1.5 pipeline (which has no factor) and the documented factor have it; below 1, those
        before int(steps * factor), as the SDXL pipeline counts them (schedulers that call the denoiser more than
        once a step, PNDM and Heun, run out of the fraction early there, so here too)."""
        return self.conditioning_factor >= 1.0 or step < int(steps * self.conditioning_factor)

    @staticmethod
    def contributor(applications: tuple[T2IAdapterApplication, ...]) -> T2IAdapters:
        return T2IAdapters(applications)


def adapter_contributors(applications: Sequence[Any]) -> tuple[Any, ...]:
    """The Sampler's contributors for its ADAPTER list: one per kind of application, given all of that kind in
    list order (several T2I-Adapters combine into one set of features)."""
    kinds: dict[type, list[Any]] = {}
    for application in applications:
        kinds.setdefault(type(application), []).append(application)
    return tuple(kind.contributor(tuple(group)) for kind, group in kinds.items())


class T2IAdapters:
    """The T2I-Adapters of a request: their features computed once, added to every call they are active for."""

    def __init__(self, applications: tuple[T2IAdapterApplication, ...]) -> None:
        self.applications = applications
        self.states: dict[tuple[int, ...], list[torch.Tensor]] = {}  # by the indices of the active applications

    def hold(self, held: ExitStack, session: Session) -> None:
        request = session.request
        wrong = [f"T2I-Adapter {index + 1} ({application.adapter.source}) is "
                 f"{FAMILY_NAMES[application.adapter.family]}" for index, application in enumerate(self.applications)
                 if application.adapter.family != request.model.family]
        if wrong:
            raise NodeInputError(f"the model is {FAMILY_NAMES.get(request.model.family, request.model.family)} "
                                 f"({request.model.source}) but {', '.join(wrong)}; use adapters made for its family")
        self.guider = session.guider
        self.steps = session.steps_run
        # the adapters run now and are let go: each step only adds the features
        self.features = [_features(application, request) for application in self.applications]
        shapes = {tuple(tuple(feature.shape[1:]) for feature in features) for features in self.features}
        if len(shapes) > 1:
            raise NodeInputError("the T2I-Adapters give features of different shapes, which cannot be added up; use "
                                 "adapters of one architecture (the same channels and downscale factor)")

    def contribute(self, call: DenoiserCall) -> None:
        active = tuple(index for index, application in enumerate(self.applications)
                       if application.active(call.index, self.steps))
        if active:
            states = self.states.get(active)
            if states is None:
                states = self.states[active] = [self.guider.batch(state) for state in self._combined(active)]
            call.extra["down_intrablock_additional_residuals"] = [state.clone() for state in states]

    def _combined(self, active: tuple[int, ...]) -> list[torch.Tensor]:
        """The active adapters' features times their scales: one adapter as the pipelines scale it, several as
        MultiAdapter weighs and sums them (the weights as one float32 tensor)."""
        import torch

        if len(self.applications) == 1:
            scale = self.applications[0].scale
            return [feature * scale for feature in self.features[0]]
        weights = torch.tensor([self.applications[index].scale for index in active], dtype=torch.float32)
        combined = [weights[0] * feature for feature in self.features[active[0]]]
        for weight, index in zip(weights[1:], active[1:], strict=True):
            for level, feature in enumerate(self.features[index]):
                combined[level] += weight * feature
        return combined

    def after_step(self, latents: torch.Tensor, timesteps: torch.Tensor, index: int) -> torch.Tensor:
        return latents


def _features(application: T2IAdapterApplication, request: SamplingRequest) -> list[torch.Tensor]:
    """One adapter's features for the request's batch: [batch, C, h, w] per level, on the adapter's device."""
    import torch

    from graphflow.models.devices import torch_dtype

    handle = application.adapter.adapter
    config = handle.config
    factor = int(config.get("downscale_factor", 8))
    if request.width % factor or request.height % factor:
        raise NodeInputError(f"the output size {request.width}x{request.height} must be a multiple of {factor} for "
                             f"this T2I-Adapter ({application.adapter.source}), which splits the image into "
                             f"{factor}x{factor} blocks")
    image = application.image
    if image.shape[0] not in (1, request.batch):
        raise NodeInputError(f"a T2I-Adapter image batch has {image.shape[0]} images for {request.batch} latents; "
                             "give 1 image or one per latent")
    pixels = _adapter_pixels(image, request.width, request.height, int(config.get("in_channels", 3)))
    with handle.use() as adapter:
        features = adapter(pixels.to(handle.key.device, torch_dtype(handle.key.dtype)))
    repeats = request.batch // pixels.shape[0]
    return [torch.repeat_interleave(feature, repeats, dim=0) for feature in features]


def _adapter_pixels(image: torch.Tensor, width: int, height: int, channels: int) -> torch.Tensor:
    """[B, channels, H, W] in 0..1 as the adapter pipelines prepare PIL images: 8-bit, Lanczos-resized to the
    output size; one-channel adapters (sketch, canny) take PIL's grey ("L"). RGB images of the output size are
    used as they are, as the pipelines use tensors."""
    import torch

    from nodes.imaging import resize_like_pil

    if channels == 3 and image.shape[1:3] == (height, width):
        return image.to("cpu", torch.float32).permute(0, 3, 1, 2)
    if channels not in (1, 3):
        raise NodeInputError(f"this T2I-Adapter takes {channels}-channel images; graphflow gives RGB (3) or grey (1)")
    return resize_like_pil(image, width, height, grey=channels == 1).permute(0, 3, 1, 2)


def _load_adapter(manager: Any, source: Any, where: Any, config: Any) -> T2IAdapterModel:
    from graphflow.models.loading import load_t2i_adapter

    handle = load_t2i_adapter(manager, source, where, config)
    family: Family = "sdxl" if handle.config.get("adapter_type") == "full_adapter_xl" else "sd15"
    return T2IAdapterModel(family, source.key, handle)


class T2IAdapterLoader(Node):
    """Load a T2I-Adapter (SD1.5 or SDXL), e.g. TencentARC/t2iadapter_canny_sd15v2."""

    category = "adapters"
    uses_options = ("device", "dtype")
    inputs = (
        Input("model", STRING, "A Hugging Face hub id, a local diffusers T2I-Adapter folder, or a single .safetensors "
              "file of its weights (diffusers' layout, with config); local paths are relative to the input "
              "directory. Pickle formats (.pth, .bin, .pt) are refused.", model=True),
        Input("config", STRING, "Single .safetensors files only, and required for them: the T2I-Adapter folder or hub "
              "id (relative to the input directory when local) whose config.json describes the file's model.",
              default="", model=True),
    )
    outputs = (Output("adapter", T2I_ADAPTER, "The T2I-Adapter, for T2IAdapterApply."),)

    def run(self, ctx: RunContext, model: str, config: str) -> dict[str, Any]:
        return {"adapter": _load(ctx, model, config, _load_adapter)}


class T2IAdapterApply(Node):
    """Guide sampling with a T2I-Adapter and its image; link several (and ControlNets) into the Sampler."""

    category = "adapters"
    inputs = (
        Input("adapter", T2I_ADAPTER, "The T2I-Adapter, from T2IAdapterLoader."),
        Input("image", IMAGE, "The condition image (edges, depth, sketch, ...) in the form the adapter was trained "
              "on; resized to the output size as diffusers does (8-bit, Lanczos) when it differs."),
        Input("scale", FLOAT, "How much the adapter's features count (diffusers' adapter_conditioning_scale; with "
              "several adapters, their MultiAdapter weights).", default=1.0, min=0.0, max=10.0),
        Input("conditioning_factor", FLOAT, "Fraction of the steps, from the start, that the adapter guides "
              "(adapter_conditioning_factor).", default=1.0, min=0.0, max=1.0),
    )
    outputs = (Output("adapter", ADAPTER, "The adapter application, for the Sampler's adapters list."),)

    def run(self, ctx: RunContext, adapter: T2IAdapterModel, image: torch.Tensor, scale: float,
            conditioning_factor: float) -> dict[str, Any]:
        return {"adapter": T2IAdapterApplication(adapter, image, float(scale), float(conditioning_factor))}


NODES = (T2IAdapterLoader, T2IAdapterApply)
