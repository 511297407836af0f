"""Latents and sampling: EmptyLatent, Sampler, VAEEncode, VAEDecode.

The Sampler gives the same pixels as the equivalent diffusers pipeline for the same model, seed
and settings (see nodes/denoise.py); LATENT's layout is in nodes/latents.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from graphflow.models.components import FAMILY_NAMES, Autoencoder, DiffusionModel
from graphflow.models.memory import ATTENTION_OPTIONS, VAE_OPTIONS, memory_options
from graphflow.node import Input, Node, Output
from graphflow.types import BOOL, CONDITIONING, CONTROL, FLOAT, IMAGE, INT, LATENT, MASK, MODEL, STRING, VAE
from nodes.adapters import ADAPTER
from nodes.conditioning import Conditioning
from nodes.latents import LATENT_SCALE, Latent, check_size, group_rows
from nodes.schedulers import SCHEDULER_NAMES

if TYPE_CHECKING:
    import torch

    from nodes.backends import Geometry
    from nodes.conditioning import ControlApplication
    from nodes.denoise import SamplingRequest

_MAX_SIDE = 16384


class EmptyLatent(Node):
    """The size and number of images to generate from pure noise (text-to-image)."""

    category = "sampling"
    inputs = (
        Input("width", INT, "Image width in pixels, a multiple of 8.", default=512, min=8, max=_MAX_SIDE),
        Input("height", INT, "Image height in pixels, a multiple of 8.", default=512, min=8, max=_MAX_SIDE),
        Input("batch", INT, "How many images to generate at once, each from its own noise.", default=1, min=1, max=64),
    )
    outputs = (Output("latent", LATENT, "All-zero latents marked empty: the Sampler starts them from pure noise."),)

    def run(self, ctx: RunContext, width: int, height: int, batch: int) -> dict[str, Any]:
        import torch

        check_size(width, height, "the size")
        # explicit dtype: a model loading in another thread may switch torch's process-wide default for a while
        samples = torch.zeros(batch, 4, height // LATENT_SCALE, width // LATENT_SCALE, dtype=torch.float32)
        return {"latent": Latent(samples, empty=True)}


class Sampler(Node):
    """Denoise latents with a UNet, prompts and ControlNets: text-to-image, img2img or inpainting."""

    category = "sampling"
    version = "1.1.0"  # seed takes a list
    disk_cache = True
    uses_options = ATTENTION_OPTIONS  # sliced attention differs from the default in the last bits
    inputs = (
        Input("model", MODEL, "The denoising UNet, from CheckpointLoader."),
        Input("positive", CONDITIONING, "What the image should show, from TextEncode."),
        Input("negative", CONDITIONING, "What it should not show. Unlinked: what diffusers uses without a negative "
              "prompt (the encoded empty prompt for SD1.5, zeros for SDXL).", optional=True),
        Input("control", CONTROL, "ControlNet applications from ControlApply; their residuals add up in list order.",
              optional=True, list=True),
        Input("adapters", ADAPTER, "Adapter applications from T2IAdapterApply; several T2I-Adapters add up weighted "
              "by their scales, beside the ControlNets.", optional=True, list=True),
        Input("latent", LATENT, "Start point: EmptyLatent for text-to-image, VAEEncode of an image for img2img (or "
              "inpainting, with a mask). Unlinked: text-to-image at width x height.", optional=True),
        Input("mask", MASK, "Inpainting: 1 (white) is repainted, 0 kept; the size of the latent's image. Unlinked: "
              "the mask given to VAEEncode, if any. 9-channel inpainting UNets need VAEEncode to have it too.",
              optional=True),
        Input("seed", INT, "Noise seed: the same seed and settings give the same image, and the same as diffusers "
              "with generator=torch.Generator('cpu').manual_seed(seed). A list of seeds samples one image per seed "
              "(times the batch), each on its own, so each equals the diffusers call with that seed; VAEDecode "
              "decodes them one at a time too. A latent from such a Sampler (also through LatentUpscale) pairs its "
              "seeds' images with as many seeds here; any other latent, an encoded image batch too, is sampled "
              "whole once per seed.", default=0, min=0, max=2**64 - 1, list=True),
        Input("steps", INT, "Denoising steps of the full schedule.", default=30, min=1, max=1000),
        Input("cfg", FLOAT, "Classifier-free guidance scale; 1 or less turns guidance (and the negative) off.",
              default=7.5, min=0.0, max=100.0),
        Input("scheduler", STRING, "Sampling method: default is the checkpoint's own scheduler; the others are "
              "diffusers' DDIM, Euler, Euler ancestral, Heun, DPM++ 2M (also with Karras sigmas), UniPC, PNDM and LMS "
              "schedulers, made from the checkpoint's scheduler config.", default="default", choices=SCHEDULER_NAMES),
        Input("strength", FLOAT, "With a latent to start from: how much of it is repainted (img2img strength); "
              "the schedule's last floor(strength * steps) steps run. Text-to-image ignores it.",
              default=1.0, min=0.0, max=1.0),
        Input("guess_mode", BOOL, "ControlNet guess mode: the ControlNets see only the positive prompt, their "
              "shallow layers weighted down, so they recognise the content even without a prompt.", default=False),
        Input("width", INT, "Text-to-image without a latent: width in pixels, a multiple of 8; 0 takes the first "
              "control image's (rounded down to a multiple of 8), else the model's native size.",
              default=0, min=0, max=_MAX_SIDE),
        Input("height", INT, "Like width, for the height.", default=0, min=0, max=_MAX_SIDE),
    )
    outputs = (Output("latent", LATENT, "The denoised latents, for VAEDecode or another Sampler."),)

    def run(self, ctx: RunContext, model: DiffusionModel, positive: Conditioning, negative: Conditioning | None,
            control: list[ControlApplication] | None, latent: Latent | None, mask: torch.Tensor | None,
            seed: int | list[int], steps: int, cfg: float, scheduler: str, strength: float, guess_mode: bool,
            width: int, height: int, adapters: list[Any] | None = None) -> dict[str, Any]:
        import torch

        from nodes.adapters import adapter_contributors
        from nodes.backends import backend_for
        from nodes.denoise import SamplingRequest, sample

        model, contributors = _contributing_patches(model)
        controls = tuple(control or ())
        _check_families(model, positive, negative, controls, latent)
        backend = backend_for(model)
        geometry = backend.geometry(model)
        batch, width, height = _output_size(model, geometry, controls, latent, width, height)
        _check_inpainting(model, backend.denoiser_channels(model), geometry, latent, mask, batch, width, height)
        seeds = _seeds(seed)
        request = SamplingRequest(model, positive, negative, controls, latent, mask, seeds[0], steps, cfg, scheduler,
                                  strength, guess_mode, batch, width, height,
                                  (*contributors, *adapter_contributors(adapters or ())))
        requests = _per_seed(request, seeds)
        samples = [sample(ctx, each, (index, len(requests))) for index, each in enumerate(requests)]
        return {"latent": Latent(torch.cat(samples) if len(samples) > 1 else samples[0], model.family, geometry.scale,
                                 groups=len(samples))}


def _per_seed(request: SamplingRequest, seeds: list[int]) -> list[SamplingRequest]:
    """One request per seed. A latent sampled one seed at a time (its `groups`, e.g. a hires fix's first pass) pairs
    its groups with as many seeds, each group refined with its own; one seed takes the whole batch at once."""
    latent = request.latent
    if latent is None or latent.groups == 1 or len(seeds) == 1:
        return [replace(request, seed=seed) for seed in seeds]
    if len(seeds) != latent.groups:
        raise NodeInputError(f"the latent holds the images of {latent.groups} seeds, sampled one by one, but the "
                             f"Sampler has {len(seeds)} seeds; give {latent.groups} seeds (one per group) or one for "
                             "the whole batch")
    return [replace(request, seed=seed, latent=latent.group(index), batch=latent.samples.shape[0] // latent.groups,
                    mask=group_rows(request.mask, index, latent.groups)) for index, seed in enumerate(seeds)]


def _seeds(seed: int | list[int]) -> list[int]:
    """The seeds to sample with, one image (times the batch) each."""
    seeds = seed if isinstance(seed, list) else [seed]
    if not seeds:
        raise NodeInputError("seed is an empty list; give one seed, or a list with one seed per image")
    return seeds


def _contributing_patches(model: DiffusionModel) -> tuple[DiffusionModel, tuple[Any, ...]]:
    """The model without the patches that act by adding to each denoiser call (IP-Adapters) rather than on the
    UNet's weights, and their contributors: one per patch class (its `contributor` class method), for all its patches
    in order."""
    kinds: dict[type, list[Any]] = {}
    for patch in model.patches:
        if hasattr(type(patch), "contributor"):
            kinds.setdefault(type(patch), []).append(patch)
    if not kinds:
        return model, ()
    rest = tuple(patch for patch in model.patches if type(patch) not in kinds)
    return replace(model, patches=rest), tuple(kind.contributor(tuple(patches)) for kind, patches in kinds.items())


def _family_name(family: str) -> str:
    return FAMILY_NAMES.get(family, family)


def _check_families(model: DiffusionModel, positive: Conditioning, negative: Conditioning | None,
                    controls: tuple[ControlApplication, ...], latent: Latent | None) -> None:
    """Every part must belong to the model's family (SD1.5 or SDXL): their shapes and meanings differ."""
    parts = [("positive conditioning", positive.family)]
    if negative is not None:
        parts.append(("negative conditioning", negative.family))
    parts.extend((f"ControlNet {index + 1} ({control.controlnet.source})", control.controlnet.family)
                 for index, control in enumerate(controls))
    if latent is not None and latent.family is not None:
        parts.append(("latent", latent.family))
    wrong = [f"the {name} is {_family_name(family)}" for name, family in parts if family != model.family]
    if wrong:
        raise NodeInputError(f"the model is {_family_name(model.family)} ({model.source}) but {', '.join(wrong)}; "
                             "use the text encoders, ControlNets and latents made for the same family")


def _output_size(model: DiffusionModel, geometry: Geometry, controls: tuple[ControlApplication, ...],
                 latent: Latent | None, width: int, height: int) -> tuple[int, int, int]:
    """(batch, width, height): the latent's, else width x height with 0 meaning the pipelines' default."""
    scale = geometry.scale
    if latent is not None:
        size = latent.size
        if not latent.empty and (latent.channels, latent.scale) != (geometry.channels, scale):
            raise NodeInputError(f"the latent has {latent.channels} channels of {latent.scale}x{latent.scale} pixels "
                                 f"each, but the model ({model.source}) denoises {geometry.channels} channels of "
                                 f"{scale}x{scale}; encode the image with the VAE of the model's checkpoint")
        if (width or size[0], height or size[1]) != size:
            raise NodeInputError(f"width x height ({width}x{height}) differ from the latent's {size[0]}x{size[1]}; "
                                 "set them to 0 (the latent decides) or unlink the latent")
        if latent.empty:
            check_size(*size, "the latent's size", f" for this model ({scale} pixels per latent)", scale)
        return latent.samples.shape[0], *size
    if controls:
        _, rows, columns, _ = controls[0].image.shape
        default = (columns - columns % scale, rows - rows % scale)
    else:
        native = model.unet.config.get("sample_size", 64)
        native = native if isinstance(native, int) else native[0]
        default = (native * scale, native * scale)
    width, height = width or default[0], height or default[1]
    check_size(width, height, "the output size", f" ({scale} pixels per latent of this model)", scale)
    return 1, width, height


def _check_inpainting(model: DiffusionModel, accepted: tuple[int, ...], geometry: Geometry, latent: Latent | None,
                      mask: torch.Tensor | None, batch: int, width: int, height: int) -> None:
    """A mask needs an encoded image to keep; an inpainting UNet needs the masked image's latents, from the same
    mask. `accepted` are the input channel counts the model's denoiser may take (latents; latents, mask and
    masked image)."""
    if model.in_channels not in accepted:
        raise NodeInputError(f"the UNet takes {model.in_channels} input channels; graphflow samples with "
                             f"{' or '.join(map(str, accepted))}-channel UNets of {geometry.channels}-channel latents "
                             "(the larger: inpainting UNets)")
    inpainting_unet = model.in_channels != geometry.channels
    encoded = latent is not None and not latent.empty
    effective = mask if mask is not None else (latent.mask if latent is not None else None)
    if effective is None:
        if inpainting_unet:
            raise NodeInputError(f"this is a {model.in_channels}-channel inpainting UNet: it needs an image and a "
                                 "mask; link VAEEncode (with its mask input) to latent, or use an ordinary checkpoint")
        return
    if not encoded:
        raise NodeInputError("inpainting needs the image to keep outside the mask: link VAEEncode of it to latent")
    if effective.shape[1:] != (height, width):
        raise NodeInputError(f"the mask is {effective.shape[2]}x{effective.shape[1]} but the image is "
                             f"{width}x{height}; resize the mask to the image (e.g. with ResizePad)")
    if len(effective) not in (1, batch):
        raise NodeInputError(f"the mask batch has {len(effective)} masks for {batch} latents; give 1 mask or one "
                             "per latent")
    if inpainting_unet:
        _check_masked_image(latent, mask)


def _check_masked_image(latent: Latent, mask: torch.Tensor | None) -> None:
    import torch

    from nodes.latents import binary_mask

    if latent.masked_moments is None:
        raise NodeInputError("9-channel inpainting UNets also see the masked image: give VAEEncode the mask too "
                             "(its mask input)")
    if mask is not None and not torch.equal(binary_mask(mask), binary_mask(latent.mask)):
        raise NodeInputError("the Sampler's mask differs from the one VAEEncode masked the image with; link the same "
                             "mask to both (or only to VAEEncode)")


class VAEEncode(Node):
    """Encode an image into latents, the start point of img2img and inpainting."""

    category = "sampling"
    disk_cache = True
    uses_options = VAE_OPTIONS  # tiles change the latents, slices their last bits
    inputs = (
        Input("vae", VAE, "The autoencoder, from CheckpointLoader or VAELoader."),
        Input("image", IMAGE, "The image to encode; width and height must be multiples of 8."),
        Input("mask", MASK, "For inpainting: 1 (white) = repaint. Also encodes the image with the masked area "
              "blanked, which 9-channel inpainting UNets need; the Sampler uses it unless given its own.",
              optional=True),
    )
    outputs = (Output("latent", LATENT, "The image's latent distribution; the Sampler draws from it with its seed."),)

    def run(self, ctx: RunContext, vae: Autoencoder, image: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
        import torch

        from nodes.latents import binary_mask, encode, image_to_pixels

        check_size(image.shape[2], image.shape[1], "the image", " (resize or pad it first, e.g. with ResizePad)",
                   vae.scale)
        if mask is not None and (mask.shape[1:] != image.shape[1:3] or len(mask) not in (1, len(image))):
            raise NodeInputError(f"the mask ({len(mask)} x {mask.shape[2]}x{mask.shape[1]}) must match the image "
                                 f"({len(image)} x {image.shape[2]}x{image.shape[1]}) in size, and be 1 or as many")
        pixels = image_to_pixels(image)
        memory = memory_options(ctx.options)
        with torch.no_grad():
            moments = encode(vae, pixels, memory)
            masked = None if mask is None else encode(vae, pixels * (binary_mask(mask) < 0.5), memory)
            latent = Latent(vae.scaling_factor * moments.chunk(2, dim=1)[0], vae.family, vae.scale, False, moments,
                            vae.scaling_factor, mask, masked)
        return {"latent": latent}


class VAEDecode(Node):
    """Decode latents into an image."""

    category = "sampling"
    uses_options = VAE_OPTIONS  # tiles change the pixels, slices their last bits
    inputs = (
        Input("vae", VAE, "The autoencoder, from CheckpointLoader or VAELoader."),
        Input("latent", LATENT, "The latents to decode, e.g. from the Sampler."),
    )
    outputs = (Output("image", IMAGE, "The decoded images, in 0..1."),)

    def run(self, ctx: RunContext, vae: Autoencoder, latent: Latent) -> dict[str, Any]:
        import torch

        from nodes.latents import decode

        family = latent.family
        if vae.family is not None and family is not None and vae.family != family:
            raise NodeInputError(f"the VAE is {_family_name(vae.family)} ({vae.source}) but the latents are "
                                 f"{_family_name(family)}; decode with the VAE of the model that made them")
        if (latent.channels, latent.scale) != (vae.latent_channels, vae.scale):
            raise NodeInputError(f"the latents have {latent.channels} channels of {latent.scale}x{latent.scale} "
                                 f"pixels but the VAE ({vae.source}) decodes {vae.latent_channels} channels of "
                                 f"{vae.scale}x{vae.scale}; decode with the VAE of the model that made them")
        memory = memory_options(ctx.options)
        with torch.no_grad():
            if latent.groups == 1:
                return {"image": decode(vae, latent, memory)}
            # sampled one seed at a time: each seed's images decoded on their own too, as its pipeline call would
            return {"image": torch.cat([decode(vae, latent.group(index), memory) for index in range(latent.groups)])}


NODES = (EmptyLatent, Sampler, VAEEncode, VAEDecode)
