"""LoraLoader: a LoRA applied to a checkpoint's MODEL and CLIP, as patches the values carry (stackable).

The shared UNet and text encoders are never changed: the patches are applied while a node uses the module
(graphflow.models.patches), as diffusers' `load_lora_weights` + `set_adapters` apply them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from graphflow.node import Input, Node, Output
from graphflow.types import CLIP, FLOAT, MODEL, STRING

_STRENGTH = ("How much the LoRA changes the {what} (diffusers' adapter weight): 1 as trained, 0 leaves it out, "
             "negative values push the other way. ComfyUI's range.")


class LoraLoader(Node):
    """Apply a LoRA (diffusers/peft or kohya/A1111 .safetensors) to a MODEL and its CLIP; chain them to stack LoRAs."""

    category = "adapters"
    uses_options = ("device", "dtype")
    inputs = (
        Input("model", MODEL, "The UNet to patch, from CheckpointLoader or another LoraLoader."),
        Input("clip", CLIP, "The text encoder(s) to patch, from the same checkpoint."),
        Input("lora", STRING, "A LoRA .safetensors file (local paths are relative to the input directory), a folder "
              "or Hugging Face hub id holding one (pytorch_lora_weights.safetensors when there are several). Pickle "
              "formats (.ckpt, .bin, .pt) are refused.", model=True),
        Input("strength_model", FLOAT, _STRENGTH.format(what="UNet"), default=1.0, min=-100.0, max=100.0),
        Input("strength_clip", FLOAT, _STRENGTH.format(what="text encoders"), default=1.0, min=-100.0, max=100.0),
    )
    outputs = (
        Output("model", MODEL, "The UNet with the LoRA, for Sampler or another LoraLoader."),
        Output("clip", CLIP, "The text encoder(s) with the LoRA, for TextEncode or another LoraLoader."),
    )

    def run(self, ctx: RunContext, model: Any, clip: Any, lora: str, strength_model: float,
            strength_clip: float) -> dict[str, Any]:
        from graphflow.models.components import FAMILY_NAMES
        from graphflow.models.patches import LORA_FILES, LoraPatch, load_lora
        from graphflow.models.sources import locate

        if model.family != clip.family:
            raise NodeInputError(f"model is {FAMILY_NAMES[model.family]} but clip is {FAMILY_NAMES[clip.family]}: give "
                             "the MODEL and CLIP of one checkpoint")
        source = locate(lora, ctx.paths, node=ctx.node, input="lora", files=LORA_FILES)
        weights = load_lora(ctx.models, source, model.family, model.unet.config)
        return {"model": replace(model, patches=(*model.patches, LoraPatch(weights, float(strength_model)))),
                "clip": replace(clip, patches=(*clip.patches, LoraPatch(weights, float(strength_clip))))}


NODES = (LoraLoader,)
