"""IP-Adapter (image prompts): CLIPVisionLoader, IPAdapterLoader, IPAdapterApply.

IPAdapterApply encodes its images with the CLIP vision model as diffusers' `prepare_ip_adapter_image_embeds` does
and returns the MODEL with an `IPAdapterPatch`: while the Sampler runs, the `IPAdapters` contributor puts diffusers'
IP-Adapter attention processors and image projection into the held UNet (the UNet's own `_load_ip_adapter_weights`,
then the scales as `set_ip_adapter_scale` sets them) and adds the image embeddings to every denoiser call as
`added_cond_kwargs["image_embeds"]`, one tensor per adapter. Its own processors and projection go back when the
Sampler lets go of the UNet, so a graph without the adapter, sharing the UNet, never sees it. The same seed and
settings give the pixels of a diffusers pipeline after `load_ip_adapter` + `set_ip_adapter_scale`, called with
`ip_adapter_image=`.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphflow import types
from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from graphflow.models.components import DiffusionModel
from graphflow.models.manager import LOAD_LOCK, ModelHandle, ModelKey, ModelManager
from graphflow.models.sources import ModelNotFoundError, ModelSource, refuse_pickle, require_safetensors, verified
from graphflow.node import Input, Node, Output
from graphflow.types import FLOAT, IMAGE, MODEL, STRING

if TYPE_CHECKING:
    import torch

    from nodes.denoise import DenoiserCall, Session

CLIP_VISION = types.register("CLIP_VISION", "a CLIP vision encoder (CLIPVisionModelWithProjection) and its image "
                                            "processor, held by the model manager")
IP_ADAPTER = types.register("IP_ADAPTER", "IP-Adapter weights (image projection and cross-attention layers), held by "
                                          "the model manager")
CLIP_VISION_FILES = ("config.json", "model.safetensors", "*.json")  # what a hub repository must hold (locate's files)
IP_ADAPTER_FILES = ("*.safetensors",)
_SLICED = frozenset({"SlicedAttnProcessor", "SlicedAttnAddedKVProcessor"})
_PARTS = ("image_proj", "ip_adapter")  # an IP-Adapter file's tensor name prefixes, as load_ip_adapter reads them


@dataclass(frozen=True, eq=False)
class ClipVision:
    """CLIP_VISION: the image encoder and the image processor that prepares its input."""

    source: str
    encoder: ModelHandle
    processor: Any = field(repr=False)


@dataclass(eq=False)
class IPAdapterWeights:
    """An IP-Adapter file's tensors by part, with the part's prefix taken off, as `load_ip_adapter` reads them."""

    state_dict: dict[str, dict[str, Any]] = field(repr=False)

    def parameters(self) -> list[Any]:  # what the manager counts (module_bytes)
        return [tensor for part in self.state_dict.values() for tensor in part.values()]

    def buffers(self) -> list[Any]:
        return []


@dataclass(frozen=True, eq=False)
class IPAdapter:
    """IP_ADAPTER: the weights, and what they expect of the image encoder and the UNet."""

    source: str
    weights: ModelHandle  # IPAdapterWeights
    hidden_states: bool  # Plus / full-face adapters read the encoder's penultimate hidden states, others image_embeds
    embed_dim: int  # the width of the image features the projection takes
    cross_attention_dim: int  # the UNet's, which the adapter's key/value layers read from


def read_ip_adapter(path: Path) -> IPAdapterWeights:
    """The tensors of a .safetensors IP-Adapter (never a pickle): names starting image_proj. and ip_adapter."""
    from safetensors import SafetensorError, safe_open

    refuse_pickle(path)
    state_dict: dict[str, dict[str, Any]] = {part: {} for part in _PARTS}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            for name in file.keys():  # noqa: SIM118 - safe_open has no iterator
                part, _, rest = name.partition(".")
                if part in state_dict:
                    state_dict[part][rest] = file.get_tensor(name)
    except (OSError, SafetensorError) as error:
        raise ModelNotFoundError(f"'{path}' is not a readable .safetensors IP-Adapter ({error})") from error
    empty = [part for part in _PARTS if not state_dict[part]]
    if empty:
        raise ModelNotFoundError(f"'{path}' is not an IP-Adapter: it has no {' or '.join(empty)}.* tensors (diffusers' "
                                 "load_ip_adapter reads image_proj.* and ip_adapter.*)")
    return IPAdapterWeights(state_dict)


def _adapter_file(source: ModelSource) -> Path:
    """The file itself, or the one .safetensors file of a folder (hub snapshot)."""
    if source.kind == "file":
        return source.path
    files = sorted(source.path.glob("*.safetensors"))
    if not files:
        require_safetensors(source.path, f"IP-Adapter '{source.name}'")  # names a pickle, if that is all there is
    if len(files) != 1:
        raise ModelNotFoundError(f"IP-Adapter '{source.name}': {source.path} holds {len(files)} .safetensors files "
                                 f"({', '.join(file.name for file in files[:5])}); name the file itself")
    return files[0]


def load_ip_adapter(manager: ModelManager, source: ModelSource) -> IPAdapter:
    """The IP-Adapter of `source`, read now so that a file that is none fails in its loader node."""
    path = _adapter_file(source)
    key = ModelKey("ip_adapter", source.key, path.name if source.kind != "file" else "", "as stored", "cpu")
    handle = manager.handle(key, verified(lambda: read_ip_adapter(path), source))
    with handle.use() as weights:
        projection, attention = weights.state_dict["image_proj"], weights.state_dict["ip_adapter"]
        if "proj.weight" in projection:  # IP-Adapter: a linear projection of image_embeds
            hidden_states, embed = False, projection["proj.weight"]
        elif "proj.3.weight" in projection or "latents" in projection:  # full face, Plus: of hidden states
            hidden_states, embed = True, projection.get("proj.0.weight", projection.get("proj_in.weight"))
        else:
            raise ModelNotFoundError(f"'{path}' is a FaceID IP-Adapter (or of a kind diffusers does not know); it "
                                     "needs face embeddings, which graphflow does not compute")
        if embed is None or "1.to_k_ip.weight" not in attention:
            raise ModelNotFoundError(f"'{path}' lacks {'1.to_k_ip.weight' if embed is not None else 'proj_in.weight'}; "
                                     "it is not an IP-Adapter diffusers can load")
        return IPAdapter(source.key, handle, hidden_states, int(embed.shape[-1]),
                         int(attention["1.to_k_ip.weight"].shape[1]))


@dataclass(frozen=True, eq=False)
class IPAdapterPatch:
    """An IP-Adapter on a MODEL: the adapter, its images' embeddings [1, N, ...] (and the negative ones: zeros, or
    the encoding of black images for hidden-state adapters), on the CPU, and the scale."""

    adapter: IPAdapter
    embeds: torch.Tensor
    negative: torch.Tensor
    scale: float

    @classmethod
    def contributor(cls, patches: tuple[IPAdapterPatch, ...]) -> IPAdapters:
        """The Sampler's contributor for all of a MODEL's IP-Adapters, in the order they were applied."""
        return IPAdapters(patches)


class IPAdapters:
    """A contributor: the adapters' attention processors in the UNet while the Sampler holds it, and their image
    embeddings (negative rows first, when guided) in every denoiser call."""

    def __init__(self, patches: tuple[IPAdapterPatch, ...]) -> None:
        self.patches = patches
        self.embeds: list[torch.Tensor] = []

    def hold(self, held: ExitStack, session: Session) -> None:
        import torch

        model = session.request.model
        if model.unet.manager.offload == "sequential" and model.unet.key.device != "cpu":
            raise NodeInputError(f"IP-Adapters cannot be put into {model.unet.key} under sequential offload; use "
                                 "offload 'model' or 'none'")
        unet = session.denoiser  # held by the Sampler, its patches applied
        unet = getattr(unet, "_orig_mod", unet)  # a compiled UNet's own module
        sliced = {type(processor).__name__ for processor in unet.attn_processors.values()} & _SLICED
        if sliced:  # diffusers' sliced processors have no image branch: the adapters would be dropped unseen
            raise NodeInputError(f"IP-Adapters need the UNet's own attention, but it runs {sliced.pop()} (attention "
                                 "slicing); turn attention slicing off for graphs with IP-Adapters")
        weights = [held.enter_context(patch.adapter.weights.use()).state_dict for patch in self.patches]
        held.callback(_restore, unet, unet.attn_processors, unet.encoder_hid_proj, unet.config.encoder_hid_dim_type)
        try:
            with LOAD_LOCK:  # built under accelerate's init_empty_weights, a process-global patch
                unet._load_ip_adapter_weights(weights, low_cpu_mem_usage=True)
        except (KeyError, RuntimeError, ValueError) as error:
            raise NodeInputError(f"the IP-Adapter does not fit the UNet ({model.source}): {type(error).__name__}: "
                                 f"{error}") from error
        _set_scales(unet, [patch.scale for patch in self.patches])
        guider, batch = session.guider, session.request.batch
        for patch in self.patches:
            rows = [patch.negative] * batch + [patch.embeds] * batch if guider.guided else [patch.embeds] * batch
            self.embeds.append(torch.cat(rows).to(session.device))

    def contribute(self, call: DenoiserCall) -> None:
        call.extra["added_cond_kwargs"] = {**call.extra.get("added_cond_kwargs", {}), "image_embeds": self.embeds}

    def after_step(self, latents: torch.Tensor, timesteps: torch.Tensor, index: int) -> torch.Tensor:
        return latents


def _set_scales(unet: Any, scales: list[float]) -> None:
    """What the pipeline's set_ip_adapter_scale(scales) does with one float per adapter."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

    for processor in unet.attn_processors.values():
        if isinstance(processor, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)):
            processor.scale = list(scales)


def _restore(unet: Any, processors: dict[str, Any], projection: Any, hid_dim_type: Any) -> None:
    """The UNet as it was before the adapters went in: its own projection, config entry and processors (in this
    order: a Plus adapter's projection has attention layers of its own, which attn_processors would count)."""
    unet.encoder_hid_proj = projection
    unet.config.encoder_hid_dim_type = hid_dim_type  # FrozenDict lets attributes change: what the forward reads
    unet.set_attn_processor(processors)


class CLIPVisionLoader(Node):
    """Load a CLIP vision encoder (CLIPVisionModelWithProjection), the image encoder an IP-Adapter was trained with."""

    category = "adapters"
    uses_options = ("device", "dtype")
    inputs = (
        Input("model", STRING, "A transformers CLIPVisionModelWithProjection folder (config.json, model.safetensors, "
              "optionally preprocessor_config.json; e.g. h94/IP-Adapter's models/image_encoder) or a hub id holding "
              "one; local paths are relative to the input directory. Pickle formats are refused.", model=True),
    )
    outputs = (Output("clip_vision", CLIP_VISION, "The image encoder, for IPAdapterApply."),)

    def run(self, ctx: RunContext, model: str) -> dict[str, Any]:
        from graphflow.models import placement
        from graphflow.models.loading import load_clip_vision
        from graphflow.models.sources import locate

        source = locate(model, ctx.paths, node=ctx.node, input="model", files=CLIP_VISION_FILES)
        encoder, processor = load_clip_vision(ctx.models, source, placement(ctx.options))
        return {"clip_vision": ClipVision(source.key, encoder, processor)}


class IPAdapterLoader(Node):
    """Load IP-Adapter weights (a .safetensors file, e.g. h94/IP-Adapter's ip-adapter_sd15.safetensors)."""

    category = "adapters"
    inputs = (
        Input("ip_adapter", STRING, "An IP-Adapter .safetensors file (image_proj.* and ip_adapter.* tensors, as "
              "diffusers' load_ip_adapter reads them), or a folder or hub id holding one; local paths are relative to "
              "the input directory. Pickle formats (.bin) are refused.", model=True),
    )
    outputs = (Output("ip_adapter", IP_ADAPTER, "The IP-Adapter, for IPAdapterApply."),)

    def run(self, ctx: RunContext, ip_adapter: str) -> dict[str, Any]:
        from graphflow.models.sources import locate

        source = locate(ip_adapter, ctx.paths, node=ctx.node, input="ip_adapter", files=IP_ADAPTER_FILES)
        return {"ip_adapter": load_ip_adapter(ctx.models, source)}


class IPAdapterApply(Node):
    """Prompt with images: the MODEL with an IP-Adapter that steers sampling towards the images' content and style."""

    category = "adapters"
    inputs = (
        Input("model", MODEL, "The UNet, from CheckpointLoader (or LoraLoader, or another IPAdapterApply: adapters "
              "stack)."),
        Input("ip_adapter", IP_ADAPTER, "The IP-Adapter, from IPAdapterLoader; made for the model's family."),
        Input("clip_vision", CLIP_VISION, "The image encoder the IP-Adapter was trained with, from CLIPVisionLoader."),
        Input("image", IMAGE, "The image prompt(s): every image of every linked batch prompts together (diffusers' "
              "list of images for one adapter).", list=True),
        Input("scale", FLOAT, "How strongly the images steer (diffusers' set_ip_adapter_scale): 1 as trained, 0 "
              "leaves them out; ~0.5 balances them with the text prompt.", default=1.0, min=-1.0, max=5.0),
    )
    outputs = (Output("model", MODEL, "The UNet with the IP-Adapter, for the Sampler."),)

    def run(self, ctx: RunContext, model: DiffusionModel, ip_adapter: IPAdapter, clip_vision: ClipVision,
            image: list[torch.Tensor], scale: float) -> dict[str, Any]:
        wanted = int(model.unet.config.get("cross_attention_dim", 0))
        if ip_adapter.cross_attention_dim != wanted:
            raise NodeInputError(f"the IP-Adapter reads {ip_adapter.cross_attention_dim}-wide text features but the "
                                 f"UNet ({model.source}) has {wanted}; use an IP-Adapter made for this model family")
        embeds, negative = _encode_images(clip_vision, ip_adapter, image)
        patch = IPAdapterPatch(ip_adapter, embeds, negative, float(scale))
        return {"model": replace(model, patches=(*model.patches, patch))}


def _encode_images(clip_vision: ClipVision, adapter: IPAdapter,
                   images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings, negative) [1, N, ...] of the N images, as the pipelines' `encode_image` computes them from PIL
    images: the image processor, then image_embeds (negative: zeros) or the penultimate hidden states (negative: those
    of black images)."""
    import torch
    from PIL import Image

    from nodes.imaging import to_uint8

    pictures = [Image.fromarray(pixels) for batch in images for pixels in to_uint8(batch)]
    with torch.no_grad(), clip_vision.encoder.use() as encoder:
        width = encoder.config.hidden_size if adapter.hidden_states else encoder.config.projection_dim
        if width != adapter.embed_dim:
            raise NodeInputError(f"the IP-Adapter projects {adapter.embed_dim}-wide image features but the CLIP vision "
                                 f"model ({clip_vision.source}) gives {width}; use the image encoder it was trained "
                                 "with")
        pixels = clip_vision.processor(pictures, return_tensors="pt").pixel_values
        pixels = pixels.to(encoder.device, encoder.dtype)
        if adapter.hidden_states:
            embeds = encoder(pixels, output_hidden_states=True).hidden_states[-2]
            negative = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            embeds = encoder(pixels).image_embeds
            negative = torch.zeros_like(embeds)
    return embeds[None].cpu(), negative[None].cpu()


NODES = (CLIPVisionLoader, IPAdapterLoader, IPAdapterApply)
