"""Tiny random-weight models in the standard diffusers / transformers formats, for tests and the offline demo.

`make_tiny_models(folder)` writes, in well under a second per model and under 20 MB in all:

    sd15/                 SD1.5-shaped pipeline folder (UNet, VAE, CLIP text encoder, tokenizer, scheduler)
    sd15-inpaint/         the same with a 9-channel inpainting UNet
    sdxl/                 SDXL-shaped pipeline folder (two text encoders, pooled embeddings, time ids)
    sdxl-vae/             a separate SDXL VAE folder (as an fp16-fixed VAE would be)
    controlnet-canny/, controlnet-depth/, controlnet-pose/   SD1.5 ControlNets with different weights
    controlnet-sdxl/      an SDXL ControlNet
    t2i-adapter-canny/, t2i-adapter-depth/, t2i-adapter-sdxl/, t2i-adapter-sdxl-depth/   T2I-Adapters (SD1.5, SDXL)
    dpt/                  a depth-estimation DPT model with its image processor

The models keep the real ones' geometry where it matters (latents are 1/8 of the image size,
77-token prompts, SD1.5's scheduler settings) so graphs written for real checkpoints run on them.
ControlNets are created with zero output convolutions, like real untrained ones; those are
re-initialised here so that control visibly changes the image.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphflow.models.tiny_depth import write_tiny_dpt

SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "skip_prk_steps": True}
CONTROLNETS = {"controlnet-canny": 11, "controlnet-depth": 12, "controlnet-pose": 13}
T2I_ADAPTERS = {"t2i-adapter-canny": (False, 21), "t2i-adapter-depth": (False, 22), "t2i-adapter-sdxl": (True, 23),
                "t2i-adapter-sdxl-depth": (True, 24)}
_VOCAB_SIZE = 514  # 256 byte symbols, the same with "</w>", then start and end of text

# each tiny model's writer, by name; a writer fills an empty folder (torch and diffusers load only when one runs)
_WRITERS: dict[str, Callable[[Path], Any]] = {
    "sd15": lambda folder: _write_sd15(folder, in_channels=4),
    "sd15-inpaint": lambda folder: _write_sd15(folder, in_channels=9),
    "sdxl": lambda folder: _write_sdxl(folder),
    "sdxl-vae": lambda folder: _vae(scaling_factor=0.13025).save_pretrained(folder),
    "controlnet-sdxl": lambda folder: _controlnet(sdxl=True, seed=14).save_pretrained(folder),
    **{name: (lambda folder, seed=seed: _controlnet(sdxl=False, seed=seed).save_pretrained(folder))
       for name, seed in CONTROLNETS.items()},
    **{name: (lambda folder, sdxl=sdxl, seed=seed: _t2i_adapter(sdxl, seed).save_pretrained(folder))
       for name, (sdxl, seed) in T2I_ADAPTERS.items()},
    "dpt": write_tiny_dpt,
}
TINY_NAMES = tuple(_WRITERS)


def make_tiny_models(folder: str | Path) -> Path:
    """Write every tiny model under `folder` (created if needed) and return it; existing models are kept."""
    import torch

    from graphflow.models.loading import quiet_progress

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for name, write in _WRITERS.items():
        target = root / name
        if (target / ".complete").is_file():
            continue
        # written beside the target and renamed into place, so an interrupted run leaves no half model
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            # quiet_progress first: it holds the load lock, so two builds never interleave saving and restoring the RNG
            with quiet_progress(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                write(staging)
            (staging / ".complete").write_text("written by graphflow make-tiny-models\n")
            if target.exists():
                shutil.rmtree(target)
            try:
                staging.rename(target)
            except OSError:
                if not (target / ".complete").is_file():  # not just another process finishing first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root


def default_tiny_models_dir() -> Path:
    """Where `tiny:NAME` model sources live: $GRAPHFLOW_TINY_MODELS, else graphflow's folder in the user cache."""
    configured = os.environ.get("GRAPHFLOW_TINY_MODELS")
    if configured:
        return Path(configured).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "graphflow" / "tiny-models"


def _tokenizer() -> Any:
    from transformers import CLIPTokenizer

    symbols = list(_byte_symbols())
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": index + 256 for index, symbol in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order (what CLIP's BPE works on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(byte if byte in printable else next(extra)) for byte in range(256)]


def _text_config(projection_dim: int | None = None) -> Any:
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513, vocab_size=_VOCAB_SIZE, hidden_size=32,
                          intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                          layer_norm_eps=1e-5, **extra)


def _vae(scaling_factor: float = 0.18215) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=scaling_factor)


def _unet_config(sdxl: bool) -> dict[str, Any]:
    common = {"block_out_channels": (16, 32), "layers_per_block": 1,
              "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "norm_num_groups": 4}
    if not sdxl:
        return {**common, "cross_attention_dim": 32, "attention_head_dim": 4}
    return {**common, "cross_attention_dim": 64, "attention_head_dim": (2, 4), "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32, "transformer_layers_per_block": (1, 2)}


def _unet(sdxl: bool, in_channels: int = 4) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**_unet_config(sdxl), sample_size=8, in_channels=in_channels, out_channels=4,
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def _controlnet(sdxl: bool, seed: int) -> Any:
    import torch
    from diffusers import ControlNetModel

    controlnet = ControlNetModel(**_unet_config(sdxl), in_channels=4,
                                 conditioning_embedding_out_channels=(8, 8, 16, 16))
    generator = torch.Generator().manual_seed(seed)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
    return controlnet


def _t2i_adapter(sdxl: bool, seed: int) -> Any:
    """A T2I-Adapter whose features fit the tiny UNets. Their first down block has no attention, so it takes its
    feature after downsampling, at 1/16 of the image: SDXL's layout (16 and 32 channels, both at 1/16) fits; SD1.5's
    halves the size after each feature, so the SD1.5 adapter has only the first one."""
    import torch
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    return T2IAdapter(in_channels=3, channels=[16, 32] if sdxl else [16], num_res_blocks=1, downscale_factor=16,
                      adapter_type="full_adapter_xl" if sdxl else "full_adapter")


def _scheduler() -> Any:
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config(SD_SCHEDULER)


def _write_sd15(folder: Path, in_channels: int) -> None:
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTextModel

    pipeline_class = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    pipeline = pipeline_class(vae=_vae(), text_encoder=CLIPTextModel(_text_config()), tokenizer=_tokenizer(),
                              unet=_unet(sdxl=False, in_channels=in_channels), scheduler=_scheduler(),
                              safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder)


def _write_sdxl(folder: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    scheduler = EulerDiscreteScheduler.from_config(SD_SCHEDULER)
    pipeline = StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.13025), text_encoder=CLIPTextModel(_text_config()), tokenizer=_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=32)), tokenizer_2=_tokenizer(),
        unet=_unet(sdxl=True), scheduler=scheduler)
    pipeline.save_pretrained(folder)
