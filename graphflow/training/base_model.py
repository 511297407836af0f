"""The frozen base model a ControlNet is trained against: located as loaders locate sources, loaded for training.

Its source is found by graphflow.models.sources.locate, so hub ids, local diffusers folders and `tiny:sd15` work as in
CheckpointLoader, and every file read stays inside the allowed roots. The parts are loaded here (not through the
ModelManager) because training holds them on its own device and dtype for the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graphflow.models.sources import ModelSource, locate
from graphflow.paths import PathPolicy
from graphflow.training.config import TrainingError

if TYPE_CHECKING:
    import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class FrozenBase:
    """The base model's VAE, UNet and text encoder (no gradients), its tokenizer and its noise schedule (DDPM)."""

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    dtype: torch.dtype

    def place(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the models to `device` in `dtype` (torch's own `to`: diffusers' warns of float32-only modules, which
        these models do not have)."""
        import torch

        for part in (self.vae, self.unet, self.text_encoder):
            torch.nn.Module.to(part, device=device, dtype=dtype)
        self.dtype = dtype

    def latents(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Targets in [-1, 1] encoded to scaled latents, sampled from the VAE's posterior with `generator`."""
        import torch

        with torch.no_grad():
            posterior = self.vae.encode(pixels.to(self.vae.device, self.dtype)).latent_dist
            return posterior.sample(generator=generator) * self.vae.config.scaling_factor

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The text encoder's last hidden states for `prompts`, padded to the tokenizer's length as pipelines do."""
        import torch

        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        with torch.no_grad():
            return self.text_encoder(tokens.input_ids.to(self.text_encoder.device), return_dict=False)[0]

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict: the noise, or the velocity for v_prediction schedules."""
        if self.scheduler.config.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return noise


def locate_base_model(name: str, paths: PathPolicy) -> ModelSource:
    """The located source of an SD1.5-family diffusers checkpoint: a hub id, a local folder or tiny:sd15."""
    from graphflow.models.components import family_of_unet_config

    source = locate(name, paths, node="train-controlnet", input="base_model", pipeline=True)
    if source.kind == "file" or not (source.path / "model_index.json").is_file():
        raise TrainingError(f"the base model '{name}' must be a diffusers checkpoint folder (a hub id, a local folder "
                            "with model_index.json, or tiny:sd15); single .safetensors files are not trained on")
    index = source.read_json("model_index.json")
    missing = [part for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if part not in index]
    if missing:
        raise TrainingError(f"the base model '{name}' lacks {', '.join(missing)}")
    unet = source.read_json("unet/config.json")
    if family_of_unet_config(unet) != "sd15" or unet.get("in_channels") != 4:
        raise TrainingError(f"the base model '{name}' is not an SD1.5-family text-to-image model (4 latent channels, "
                            "no pooled text embeddings); training SDXL or inpainting ControlNets is not supported")
    prediction = source.read_json("scheduler/scheduler_config.json").get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise TrainingError(f"the base model '{name}' predicts {prediction!r}; training supports "
                            f"{' and '.join(PREDICTION_TYPES)}")
    return source


def load_frozen_base(source: ModelSource) -> FrozenBase:
    """The base model's parts, frozen, in float32 on the CPU (`FrozenBase.place` moves them)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from graphflow.models.loading import quiet_progress
    from graphflow.models.sources import require_safetensors

    folder = str(source.path)
    for part in ("vae", "unet", "text_encoder"):
        require_safetensors(source.path / part, f"'{source.name}' {part}")
    with quiet_progress():
        vae, unet, text_encoder = (
            model_class.from_pretrained(folder, subfolder=part, use_safetensors=True).requires_grad_(False).eval()
            for model_class, part in ((AutoencoderKL, "vae"), (UNet2DConditionModel, "unet"),
                                      (CLIPTextModel, "text_encoder")))
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_config(source.read_json("scheduler/scheduler_config.json"))
    source.check_unchanged()
    return FrozenBase(vae, unet, text_encoder, tokenizer, scheduler, torch.float32)


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The frozen models' dtype: half precision under mixed precision (the ControlNet itself stays float32)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
