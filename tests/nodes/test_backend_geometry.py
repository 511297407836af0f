"""The sampling core reads geometry from the models: components built like diffusers' own test suite.

diffusers' fast pipeline tests (tests/pipelines/controlnet/test_controlnet.py, `get_dummy_components`)
use a two-block VAE, so one latent covers 2x2 pixels, not 8x8. Those components were not built for
graphflow: a graph over them must give the pipeline's pixels, and mismatched geometry must be a
clear error rather than a shape error deep inside the UNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from graphflow import Engine, Graph
from graphflow.errors import NodeExecutionError
from graphflow.models.manager import ModelManager
from graphflow.models.tiny import _tokenizer
from nodes import CheckpointLoader, EmptyLatent, LoadImage, Sampler, TextEncode, VAEDecode, VAEEncode, VAELoader
from tests.nodes.sampling_graphs import Control, Pipelines, compare, images_of, sampling_graph, write_test_images

pytest.importorskip("diffusers")

SUITE = "suite-sd15"  # a checkpoint folder of diffusers' test-suite components
SUITE_CONTROLNET = "suite-controlnet"
EDGES = (Control(SUITE_CONTROLNET, "edges.png"),)


def write_suite_components(folder: Path) -> Path:
    """The components of diffusers' StableDiffusionControlNetPipelineFastTests, saved as model folders (with
    graphflow's tiny byte-level tokenizer: the suite's is downloaded from the hub)."""
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=1)
    torch.manual_seed(0)
    controlnet = ControlNetModel(block_out_channels=(4, 8), layers_per_block=2, in_channels=4,
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32,
                                 conditioning_embedding_out_channels=(16, 32), norm_num_groups=1)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # untrained ControlNets add zeros; give them weights so control shows
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, norm_num_groups=2)
    torch.manual_seed(0)
    text_config = CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=32,
                                 intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
                                 num_hidden_layers=5, vocab_size=1000)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text_config), tokenizer=_tokenizer(),
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder / SUITE)
    controlnet.save_pretrained(folder / SUITE_CONTROLNET)
    return folder


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_suite_components(tmp_path_factory.mktemp("suite"))


@pytest.fixture(scope="module")
def engine(suite: Path, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    folder = tmp_path_factory.mktemp("geometry")
    (folder / "in").mkdir()
    return Engine(input_dirs=[write_test_images(folder / "in"), suite, tiny_models], output_dir=folder / "out",
                  models=ModelManager())


@pytest.fixture(scope="module")
def pipelines(suite: Path, engine: Engine) -> Pipelines:
    return Pipelines(suite, images_of(engine))


def assert_same(case: str, engine: Engine, graph: Graph, theirs: Any) -> None:
    difference, same = compare(case, engine.run(graph).outputs["image"], theirs)
    assert same and difference == 0.0, f"{case}: max abs diff {difference:.3g}"


def test_a_two_block_vae_controlnet_text_to_image_matches_the_pipeline(engine: Engine, suite: Path,
                                                                       pipelines: Pipelines) -> None:
    theirs = pipelines.run(pipelines.pipeline("StableDiffusionControlNetPipeline", SUITE, EDGES), EDGES)
    graph = sampling_graph(suite, SUITE, EDGES)
    assert_same("diffusers test-suite components (VAE factor 2), ControlNet txt2img", engine, graph, theirs)
    assert theirs.shape[1:3] == (64, 64)


def test_a_two_block_vae_img2img_matches_the_pipeline(engine: Engine, suite: Path, pipelines: Pipelines) -> None:
    pipeline = pipelines.pipeline("StableDiffusionControlNetImg2ImgPipeline", SUITE, EDGES)
    theirs = pipelines.run(pipeline, EDGES, control_key="control_image", image=pipelines.image("init.png"),
                           strength=0.6)
    graph = sampling_graph(suite, SUITE, EDGES, init_image="init.png", strength=0.6)
    assert_same("diffusers test-suite components (VAE factor 2), ControlNet img2img 0.6", engine, graph, theirs)


def test_the_latents_of_a_two_block_vae_are_half_the_image_size(engine: Engine, suite: Path) -> None:
    graph = Graph()
    sd = graph.add(CheckpointLoader(model=str(suite / SUITE)), "sd")
    latent = graph.add(VAEEncode(vae=sd.vae, image=LoadImage(path="init.png").image), "encode").latent
    graph.output("latent", latent)
    encoded = engine.run(graph).outputs["latent"]
    assert encoded.samples.shape == (1, 4, 32, 32) and encoded.scale == 2 and encoded.size == (64, 64)


def test_latents_of_another_geometry_are_refused_by_name(engine: Engine, suite: Path, tiny_models: Path) -> None:
    graph = Graph()
    suite_sd = graph.add(CheckpointLoader(model=str(suite / SUITE)), "suite")
    tiny_sd = graph.add(CheckpointLoader(model=str(tiny_models / "sd15")), "tiny")
    latent = VAEEncode(vae=tiny_sd.vae, image=LoadImage(path="init.png").image).latent  # 8 pixels per latent
    positive = TextEncode(clip=suite_sd.clip, text="x").conditioning
    graph.output("latent", graph.add(Sampler(model=suite_sd.model, positive=positive, latent=latent, steps=2,
                                             strength=0.5), "sampler").latent)
    with pytest.raises(NodeExecutionError, match=r"4 channels of 8x8 pixels .* denoises 4 channels of 2x2"):
        engine.run(graph)


def test_decoding_latents_of_another_geometry_is_refused_by_name(engine: Engine, suite: Path,
                                                                  tiny_models: Path) -> None:
    graph = Graph()
    suite_sd = graph.add(CheckpointLoader(model=str(suite / SUITE)), "suite")
    tiny_sd = graph.add(CheckpointLoader(model=str(tiny_models / "sd15")), "tiny")
    latent = VAEEncode(vae=tiny_sd.vae, image=LoadImage(path="init.png").image).latent
    graph.output("image", graph.add(VAEDecode(vae=suite_sd.vae, latent=latent), "decode").image)
    with pytest.raises(NodeExecutionError, match=r"decodes 4 channels of 2x2"):
        engine.run(graph)


def test_text_to_image_sizes_need_whole_latents_of_the_models_geometry(engine: Engine, suite: Path) -> None:
    graph = sampling_graph(suite, SUITE, EDGES, width=66, height=64)  # 2 pixels per latent: 66 is fine
    assert engine.run(graph).outputs["image"].shape == (1, 64, 66, 3)
    with pytest.raises(NodeExecutionError, match="multiples of 2"):
        engine.run(sampling_graph(suite, SUITE, EDGES, width=65, height=64))


def test_an_empty_latent_gives_only_its_size_to_a_model_of_any_geometry(engine: Engine, suite: Path) -> None:
    graph = sampling_graph(suite, SUITE, EDGES, latent=EmptyLatent(width=64, height=64).latent)
    assert engine.run(graph).outputs["image"].shape == (1, 64, 64, 3)


def test_an_sdxl_vae_with_sd15s_scaling_factor_decodes_sdxl_latents(engine: Engine, tiny_models: Path,
                                                                     tmp_path: Path) -> None:
    """A VAE's scaling factor does not decide its family: one loaded on its own fits any model of its geometry."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_models / "sdxl" / "vae")
    vae.register_to_config(scaling_factor=0.18215)
    folder = images_of(engine) / "xl-vae-0.18215"
    vae.save_pretrained(folder)
    graph = Graph()
    xl = graph.add(CheckpointLoader(model=str(tiny_models / "sdxl")), "xl")
    sampled = Sampler(model=xl.model, positive=TextEncode(clip=xl.clip, text="x").conditioning, steps=2, width=64,
                      height=64).latent
    graph.output("image", graph.add(VAEDecode(vae=VAELoader(model=folder.name).vae, latent=sampled), "decode").image)
    image = engine.run(graph).outputs["image"]
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
