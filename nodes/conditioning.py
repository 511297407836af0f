"""Prompts and control for the Sampler: TextEncode and ControlApply.

A CONDITIONING is a `Conditioning` (a frozen dataclass the on-disk cache stores field by field): the
text encoder's hidden states `embeds` [1, T, D] (SDXL: both encoders', concatenated), SDXL's pooled
projection `pooled` [1, P], and `default_negative`, what the diffusers pipeline uses when no negative
prompt is given (`negative_prompt=None`): the encoded "" for SD1.5, zeros for SDXL checkpoints that set
`force_zeros_for_empty_prompt`. The Sampler falls back to the positive's when its `negative` input is
not linked, so an unlinked negative gives the same pixels as the pipeline's default.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graphflow.context import RunContext
from graphflow.disk_format import payload
from graphflow.errors import NodeInputError
from graphflow.models.components import FAMILY_NAMES, ControlNet, TextEncoders
from graphflow.node import Input, Node, Output
from graphflow.types import BOOL, CLIP, CONDITIONING, CONTROL, CONTROLNET, FLOAT, IMAGE, INT, STRING
from nodes.prompt_weighting import encode_weighted, match_lengths

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@payload
@dataclass(frozen=True, eq=False)
class Conditioning:
    """CONDITIONING: an encoded prompt, and the negative the pipelines use without one."""

    family: str
    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    default_negative: Conditioning | None = None


def encode_text(clip: TextEncoders, text: str, clip_skip: int | None,
                weighting: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeds, pooled) of one prompt, computed as the diffusers pipelines' `encode_prompt` does; with `weighting`,
    A1111's (word:1.2) emphasis and prompts of any length in 77-token chunks (nodes.prompt_weighting)."""
    if weighting:
        return encode_weighted(clip, text, clip_skip)
    if clip.family == "sd15":
        return _sd15_embeds(clip, text, clip_skip), None
    return _sdxl_embeds(clip, text, clip_skip)


# A tokenizer keeps its padding and truncation settings as state that every call sets (the fast ones in their Rust
# backend): two threads tokenizing with one at once get each other's settings, so calls take turns.
_TOKENIZING = threading.Lock()


def _tokens(tokenizer: Any, text: str) -> Any:
    """Token ids padded to the tokenizer's full length (77 for CLIP), as the pipelines tokenize."""
    with _TOKENIZING:
        tokens = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        length = len(tokenizer(text).input_ids)
    if length > tokenizer.model_max_length:
        log.warning("the prompt is longer than CLIP's %d tokens; the end was cut off: %r",
                    tokenizer.model_max_length, text)
    return tokens


def _sd15_embeds(clip: TextEncoders, text: str, clip_skip: int | None) -> torch.Tensor:
    tokens, handle = _tokens(clip.tokenizers[0], text), clip.encoders[0]
    device = handle.key.device
    with clip.use(0) as encoder:
        use_mask = getattr(encoder.config, "use_attention_mask", False)
        mask = tokens.attention_mask.to(device) if use_mask else None
        if clip_skip is None:
            hidden = encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        else:
            output = encoder(tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
            # the pipelines take an earlier layer's output through the final layer norm, as the last one went;
            # transformers 5 moved that norm from `text_model` up to the model itself
            layer = _layer(output.hidden_states, clip_skip, 1)
            hidden = getattr(encoder, "text_model", encoder).final_layer_norm(layer)
        return hidden.to(encoder.dtype)


def _sdxl_embeds(clip: TextEncoders, text: str, clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both encoders' penultimate (or earlier) layers side by side, and the second one's pooled projection."""
    import torch

    embeds, pooled, dtype = [], None, None
    for index, (tokenizer, handle) in enumerate(zip(clip.tokenizers, clip.encoders, strict=True)):
        ids = _tokens(tokenizer, text).input_ids
        with clip.use(index) as encoder:
            output = encoder(ids.to(handle.key.device), output_hidden_states=True)
            dtype = encoder.dtype
        if pooled is None and output[0].ndim == 2:
            pooled = output[0]  # CLIPTextModelWithProjection's text_embeds
        embeds.append(_layer(output.hidden_states, clip_skip or 0, 2))
    return torch.concat(embeds, dim=-1).to(dtype), pooled


def _layer(hidden_states: tuple[torch.Tensor, ...], clip_skip: int, last: int) -> torch.Tensor:
    """The layer `clip_skip` before the `last`-th from the end (1: the final layer, 2: the penultimate)."""
    most = len(hidden_states) - last
    if clip_skip > most:
        raise NodeInputError(f"clip_skip {clip_skip} reaches past the first layer of this text encoder "
                             f"({len(hidden_states) - 1} layers); use at most {most}")
    return hidden_states[-(last + clip_skip)]


def default_negative(clip: TextEncoders, embeds: torch.Tensor, pooled: torch.Tensor | None) -> Conditioning:
    """The pipelines' negative for `negative_prompt=None`: zeros where the checkpoint says so, else the encoded ""."""
    import torch

    if clip.force_zeros_for_empty_prompt:
        return Conditioning(clip.family, torch.zeros_like(embeds), None if pooled is None else torch.zeros_like(pooled))
    negative_embeds, negative_pooled = encode_text(clip, "", None)
    negative_embeds = match_lengths(embeds, negative_embeds)[1]  # a long prompt's: the "" chunk repeated
    return Conditioning(clip.family, negative_embeds, negative_pooled)


class TextEncode(Node):
    """Encode a prompt with a checkpoint's CLIP text encoder(s) for the Sampler's positive or negative input."""

    category = "conditioning"
    disk_cache = True
    inputs = (
        Input("clip", CLIP, "The text encoder(s) of a checkpoint, from CheckpointLoader."),
        Input("text", STRING, "The prompt; CLIP reads the first 77 tokens unless weighting is on.", default=""),
        Input("clip_skip", INT, "Skip this many of the text encoder's last layers (ComfyUI's CLIPSetLastLayer "
              "-1 - clip_skip); 0 uses them all. It applies to this text only; diffusers' clip_skip=N applies to the "
              "prompt and never to the negative prompt, so to match it set N on the positive TextEncode and leave "
              "the negative one at 0 (an unlinked negative is the pipelines' already).", default=0, min=0, max=24),
        Input("weighting", BOOL, "(word:1.2) emphasis and prompts longer than 77 tokens, as A1111 and ComfyUI read "
              "them: (word) x1.1, [word] /1.1, nesting multiplies, \\( a literal bracket; long prompts are encoded in "
              "75-token chunks instead of cut off. Off: the diffusers pipelines' embeddings.", default=False),
    )
    outputs = (Output("conditioning", CONDITIONING, "The prompt's embeddings (and SDXL's pooled embedding)."),)

    def run(self, ctx: RunContext, clip: TextEncoders, text: str, clip_skip: int,
            weighting: bool = False) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            embeds, pooled = encode_text(clip, text, clip_skip or None, weighting)
            negative = default_negative(clip, embeds, pooled)
        return {"conditioning": Conditioning(clip.family, embeds, pooled, negative)}


@dataclass(frozen=True, eq=False)
class ControlApplication:
    """CONTROL: one ControlNet applied with its control image, strength and guidance window."""

    controlnet: ControlNet
    image: torch.Tensor  # IMAGE [B, H, W, 3] in 0..1
    scale: float
    start: float
    end: float

    def keep(self, step: int, steps: int) -> float:
        """1 while step `step` of `steps` lies inside [start, end] of the schedule, else 0 (as the pipelines do)."""
        return 1.0 - float(step / steps < self.start or (step + 1) / steps > self.end)


class ControlApply(Node):
    """Guide sampling with a ControlNet and a control image; link several into the Sampler's control list."""

    category = "conditioning"
    inputs = (
        Input("controlnet", CONTROLNET, "The ControlNet, from ControlNetLoader."),
        Input("image", IMAGE, "The control image (edges, depth, pose, ...) in the form the ControlNet was trained "
              "on; if its size differs from the output's, the Sampler resizes it as diffusers does (8-bit, Lanczos)."),
        Input("scale", FLOAT, "Strength: how much the ControlNet's residuals count (diffusers' "
              "controlnet_conditioning_scale).", default=1.0, min=0.0, max=10.0),
        Input("start", FLOAT, "Fraction of the denoising steps after which the ControlNet starts guiding "
              "(control_guidance_start).", default=0.0, min=0.0, max=1.0),
        Input("end", FLOAT, "Fraction of the steps after which it stops (control_guidance_end); "
              "must be greater than start.", default=1.0, min=0.0, max=1.0),
    )
    outputs = (Output("control", CONTROL, "The ControlNet application, for the Sampler's control list."),)

    def run(self, ctx: RunContext, controlnet: ControlNet, image: torch.Tensor, scale: float, start: float,
            end: float) -> dict[str, Any]:
        if start >= end:
            raise NodeInputError(f"start ({start}) must be less than end ({end}): the ControlNet would guide no step")
        channels = controlnet.controlnet.config.get("conditioning_channels", 3)
        if channels != 3:
            raise NodeInputError(f"this {FAMILY_NAMES[controlnet.family]} ControlNet takes {channels}-channel control "
                                 "images; graphflow's IMAGE values are RGB")
        return {"control": ControlApplication(controlnet, image, float(scale), float(start), float(end))}


NODES = (TextEncode, ControlApply)
