"""CLIPVisionLoader + IPAdapterLoader -> IPAdapterApply -> Sampler gives the pixels of diffusers' pipelines after
`load_ip_adapter(...)` + `set_ip_adapter_scale(...)` called with `ip_adapter_image=`, and leaves the shared UNet as it
was for graphs without the adapter.

The IP-Adapters are made here as diffusers' tests make them (`create_ip_adapter_state_dict`: one to_k_ip/to_v_ip pair
per cross-attention layer, an ImageProjection), with random weights from a seeded generator so that the images
visibly change the result, saved as .safetensors with the image_proj./ip_adapter. prefixes that load_ip_adapter
reads; the image encoder is a tiny CLIPVisionModelWithProjection with its CLIPImageProcessor. Parity rows:
`pytest tests/nodes/test_ip_adapter.py -s | grep parity`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from graphflow import Engine, Graph
from graphflow.errors import NodeExecutionError
from nodes import (
    CheckpointLoader,
    CLIPVisionLoader,
    ControlApply,
    ControlNetLoader,
    EmptyLatent,
    IPAdapterApply,
    IPAdapterLoader,
    LoadImage,
    LoraLoader,
    Sampler,
    TextEncode,
    VAEDecode,
)
from tests.nodes.sampling_graphs import CANNY, PROMPT, SEED, SIZE, STEPS, compare, images_of, make_engine

pytest.importorskip("diffusers")

CLIP_VISION = "clip-vision"
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
Adapter = tuple[str, tuple[str, ...], float]  # IP-Adapter file, its image files, scale
Lora = tuple[Path, float]  # a LoRA file and its strength (for the UNet and the text encoder alike)


def write_clip_vision(folder: Path) -> Path:
    """A tiny CLIPVisionModelWithProjection (32x32 images, 8x8 patches, 32-wide projection) and its processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, projection_dim=32, intermediate_size=37, num_attention_heads=4,
                              num_hidden_layers=2, image_size=32, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def write_ip_adapter(unet_folder: Path, path: Path, seed: int, plus: bool = False) -> Path:
    """An IP-Adapter for the UNet in `unet_folder`: the layout of diffusers' `create_ip_adapter_state_dict`
    (key ids 1, 3, 5, ... for the cross-attention layers, in attn_processors order), random weights. `plus`: an
    IP-Adapter Plus, whose resampler reads the image encoder's hidden states (32 wide), else a projection of its
    32-wide image_embeds."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    config, generator = unet.config, torch.Generator().manual_seed(seed)

    def random(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * scale

    cross, channels = config.cross_attention_dim, list(config.block_out_channels)
    tensors: dict[str, torch.Tensor] = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = int(name.split(".")[1]) if not name.startswith("mid_block") else -1
        hidden = channels[-1] if block < 0 else (channels[::-1] if name.startswith("up_blocks") else channels)[block]
        tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = random(hidden, cross)
        tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = random(hidden, cross)
        key_id += 2
    if plus:
        tensors.update({f"image_proj.{name}": value for name, value in plus_projection(cross, seed).items()})
    else:
        tensors.update({"image_proj.proj.weight": random(4 * cross, 32), "image_proj.proj.bias": random(4 * cross),
                        "image_proj.norm.weight": 1 + random(cross, scale=0.1), "image_proj.norm.bias": random(cross)})
    save_file(tensors, str(path))
    return path


def plus_projection(cross: int, seed: int) -> dict[str, torch.Tensor]:
    """A random IP-Adapter Plus resampler (4 queries, 64 wide, one head) in the original file's tensor names: the
    names diffusers' `_convert_ip_adapter_image_proj_to_diffusers` converts from, turned back."""
    import re

    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = IPAdapterPlusImageProjection(embed_dims=32, output_dims=cross, hidden_dims=64, heads=1, num_queries=4)
    renames = [(r"\.ln0\.", ".0.norm1."), (r"\.ln1\.", ".0.norm2."), (r"\.attn\.to_q\.", ".0.to_q."),
               (r"\.attn\.to_out\.0\.", ".0.to_out."), (r"\.ff\.0\.", ".1.0."), (r"\.ff\.1\.net\.0\.proj\.", ".1.1."),
               (r"\.ff\.1\.net\.2\.", ".1.3.")]
    tensors = {}
    for name, value in module.state_dict().items():
        if ".attn.to_v." in name:
            continue
        if ".attn.to_k." in name:
            tensors[name.replace(".attn.to_k.", ".0.to_kv.")] = torch.cat([value, module.state_dict()[
                name.replace("to_k", "to_v")]])
            continue
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
        tensors[name] = value.clone()
    return tensors


def write_reference_images(folder: Path) -> None:
    """Two image prompts unlike each other and of different sizes (the processor resizes and crops each)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    stripes = np.stack([(x * 4) % 256, (y * 7) % 256, ((x + y) * 3) % 256], axis=-1).astype(np.uint8)
    blob = np.zeros((40, 56, 3), np.uint8)
    blob[8:30, 10:40] = (250, 40, 90)
    Image.fromarray(stripes).save(folder / "ref-a.png")
    Image.fromarray(blob).save(folder / "ref-b.png")


@pytest.fixture(scope="module")
def engine(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    engine = make_engine(tiny_models, tmp_path_factory.mktemp("ip-adapter"))
    images = images_of(engine)
    write_clip_vision(images / CLIP_VISION)
    write_reference_images(images)
    for name, checkpoint, seed in (("ip-sd15.safetensors", "sd15", 1), ("ip-sd15-b.safetensors", "sd15", 2),
                                   ("ip-sdxl.safetensors", "sdxl", 3)):
        write_ip_adapter(tiny_models / checkpoint / "unet", images / name, seed)
    write_ip_adapter(tiny_models / "sd15" / "unet", images / "ip-plus-sd15.safetensors", 4, plus=True)
    return engine


def ip_adapter_graph(tiny_models: Path, checkpoint: str, adapters: tuple[Adapter, ...], controlnet: bool = False,
                     lora: Lora | None = None, **sampler: Any) -> Graph:
    """CheckpointLoader -> (LoraLoader) -> (IPAdapterApply ...) -> Sampler (with the Canny ControlNet; more `sampler`
    inputs) -> VAEDecode, text-to-image at SIZE; output "image"."""
    graph = Graph("ip-adapter")
    sd = graph.add(CheckpointLoader(model=str(tiny_models / checkpoint)), "sd")
    model, clip = sd.model, sd.clip
    if lora is not None:
        patched = LoraLoader(model=model, clip=clip, lora=str(lora[0]), strength_model=lora[1], strength_clip=lora[1])
        model, clip = patched.model, patched.clip
    for file, images, scale in adapters:
        model = IPAdapterApply(model=model, ip_adapter=IPAdapterLoader(ip_adapter=file).ip_adapter,
                               clip_vision=CLIPVisionLoader(model=CLIP_VISION).clip_vision,
                               image=[LoadImage(path=image).image for image in images], scale=scale).model
    positive = TextEncode(clip=clip, text=PROMPT).conditioning
    control = {"control": [ControlApply(controlnet=ControlNetLoader(model=str(tiny_models / CANNY.model)).controlnet,
                                        image=LoadImage(path=CANNY.image).image).control]} if controlnet else {}
    sampled = Sampler(model=model, positive=positive, seed=SEED, steps=STEPS, width=SIZE, height=SIZE,
                      **control | sampler)
    graph.output("image", graph.add(VAEDecode(vae=sd.vae, latent=sampled.latent), "decode").image)
    return graph


def pipeline_image(tiny_models: Path, images: Path, checkpoint: str, adapters: tuple[Adapter, ...],
                   controlnet: bool = False, lora: Lora | None = None, **call: Any) -> np.ndarray:
    """diffusers' own: the pipeline loaded fresh, `load_ip_adapter` of every file, `set_ip_adapter_scale`, and
    `ip_adapter_image` with each adapter's images (a list when an adapter has several)."""
    import diffusers
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    extra: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False} if checkpoint == "sd15" else {}
    if adapters:
        extra.update(image_encoder=CLIPVisionModelWithProjection.from_pretrained(images / CLIP_VISION),
                     feature_extractor=CLIPImageProcessor.from_pretrained(images / CLIP_VISION))
    arguments: dict[str, Any] = {}
    class_name = PIPELINES[checkpoint]
    if controlnet:
        class_name = "StableDiffusionControlNetPipeline"
        extra["controlnet"] = diffusers.ControlNetModel.from_pretrained(tiny_models / CANNY.model)
        arguments["image"] = Image.open(images / CANNY.image).convert("RGB")
    pipeline = getattr(diffusers, class_name).from_pretrained(tiny_models / checkpoint, **extra)
    pipeline.set_progress_bar_config(disable=True)
    if lora is not None:
        pipeline.load_lora_weights(lora[0].parent, weight_name=lora[0].name, adapter_name="lora")
        pipeline.set_adapters(["lora"], adapter_weights=[lora[1]])
    if adapters:
        pipeline.load_ip_adapter(str(images), subfolder="", weight_name=[file for file, _, _ in adapters])
        pipeline.set_ip_adapter_scale([scale for _, _, scale in adapters])
        pictures = [[Image.open(images / name).convert("RGB") for name in names] for _, names, _ in adapters]
        arguments["ip_adapter_image"] = [group[0] if len(group) == 1 else group for group in pictures]
    arguments = {"guidance_scale": 7.5, "height": SIZE, "width": SIZE} | arguments | call
    return pipeline(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), num_inference_steps=STEPS,
                    output_type="np", **arguments).images


def assert_parity(case: str, engine: Engine, tiny_models: Path, checkpoint: str, adapters: tuple[Adapter, ...],
                  controlnet: bool = False, sampler: dict[str, Any] | None = None,
                  call: dict[str, Any] | None = None, lora: Lora | None = None) -> None:
    """The graph's image equals the pipeline's; `sampler`: more Sampler inputs, `call`: the pipeline's equivalents."""
    graph = ip_adapter_graph(tiny_models, checkpoint, adapters, controlnet, lora, **sampler or {})
    theirs = pipeline_image(tiny_models, images_of(engine), checkpoint, adapters, controlnet, lora, **call or {})
    ours = engine.run(graph).outputs["image"]
    difference, same = compare(case, ours, theirs)
    assert same and difference == 0.0, f"{case}: images differ by up to {difference:.3g}"


@pytest.mark.parametrize(("case", "checkpoint", "adapters"), [
    ("IP-Adapter SD1.5, 1 image", "sd15", (("ip-sd15.safetensors", ("ref-a.png",), 1.0),)),
    ("IP-Adapter SD1.5, 2 images", "sd15", (("ip-sd15.safetensors", ("ref-a.png", "ref-b.png"), 1.0),)),
    ("IP-Adapter SD1.5, scale 0.6", "sd15", (("ip-sd15.safetensors", ("ref-b.png",), 0.6),)),
    ("2 IP-Adapters SD1.5, scales 0.7/0.4", "sd15", (("ip-sd15.safetensors", ("ref-a.png",), 0.7),
                                                     ("ip-sd15-b.safetensors", ("ref-b.png",), 0.4))),
    ("IP-Adapter Plus SD1.5 (hidden states), 2 images, scale 0.8", "sd15",
     (("ip-plus-sd15.safetensors", ("ref-a.png", "ref-b.png"), 0.8),)),
    ("IP-Adapter SDXL, 1 image", "sdxl", (("ip-sdxl.safetensors", ("ref-a.png",), 1.0),)),
])
def test_ip_adapter_matches_the_pipeline(case: str, checkpoint: str, adapters: tuple[Adapter, ...], engine: Engine,
                                         tiny_models: Path) -> None:
    assert_parity(case, engine, tiny_models, checkpoint, adapters)


def test_ip_adapter_with_a_controlnet_matches_the_controlnet_pipeline(engine: Engine, tiny_models: Path) -> None:
    adapters = (("ip-sd15.safetensors", ("ref-a.png", "ref-b.png"), 0.8),)
    assert_parity("IP-Adapter + ControlNet SD1.5, 2 images, scale 0.8", engine, tiny_models, "sd15", adapters, True)


@pytest.mark.parametrize(("case", "sampler", "call"), [
    ("IP-Adapter SD1.5, cfg 1 (no negative rows)", {"cfg": 1.0}, {"guidance_scale": 1.0}),
    ("IP-Adapter SD1.5, EmptyLatent batch 2", {"latent": EmptyLatent(width=SIZE, height=SIZE, batch=2).latent},
     {"num_images_per_prompt": 2}),
])
def test_guidance_and_batches_match_the_pipeline(case: str, sampler: dict[str, Any], call: dict[str, Any],
                                                 engine: Engine, tiny_models: Path) -> None:
    adapters = (("ip-sd15.safetensors", ("ref-a.png", "ref-b.png"), 0.8),)
    assert_parity(case, engine, tiny_models, "sd15", adapters, sampler=sampler, call=call)


def test_ip_adapter_on_a_lora_patched_model_matches_the_pipeline(engine: Engine, tiny_models: Path) -> None:
    from tests.nodes.test_lora import make_lora

    pytest.importorskip("peft")
    lora = (make_lora(tiny_models, "sd15", images_of(engine) / "lora", seed=5), 0.8)
    adapters = (("ip-sd15.safetensors", ("ref-a.png",), 0.7),)
    assert_parity("LoRA 0.8 + IP-Adapter SD1.5, scale 0.7", engine, tiny_models, "sd15", adapters, lora=lora)


def test_attention_slicing_is_refused_with_an_ip_adapter(engine: Engine, tiny_models: Path) -> None:
    graph = ip_adapter_graph(tiny_models, "sd15", (("ip-sd15.safetensors", ("ref-a.png",), 1.0),))
    with pytest.raises(NodeExecutionError, match="turn attention slicing off"):
        engine.run(graph, options={"attention_slicing": "auto"})


def test_the_images_change_the_result(engine: Engine, tiny_models: Path) -> None:
    plain = engine.run(ip_adapter_graph(tiny_models, "sd15", ())).outputs["image"]
    prompted = engine.run(ip_adapter_graph(tiny_models, "sd15", (("ip-sd15.safetensors", ("ref-a.png",), 1.0),)))
    assert (prompted.outputs["image"] - plain).abs().max() > 0.01


@pytest.mark.parametrize(("file", "cfg"), [("ip-sd15.safetensors", 3.0), ("ip-plus-sd15.safetensors", 4.0)])
def test_a_graph_without_the_adapter_after_one_with_it_matches_plain_diffusers(file: str, cfg: float, engine: Engine,
                                                                              tiny_models: Path) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    settings = {"sampler": {"cfg": cfg}, "call": {"guidance_scale": cfg}}  # a cfg of its own: nothing cached
    assert_parity(f"{file}, then in the same Engine", engine, tiny_models, "sd15", ((file, ("ref-a.png",), 1.0),),
                  **settings)
    assert_parity("... a graph without it", engine, tiny_models, "sd15", (), **settings)
    key = next(key for key in engine.models.loaded() if key.kind == "unet" and key.source.startswith(
        str(tiny_models / "sd15") + "@"))
    with engine.models.handle(key, lambda: None).use() as unet:  # the shared UNet, as the Sampler left it
        assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
        assert {type(processor) for processor in unet.attn_processors.values()} == {AttnProcessor2_0}


def test_an_adapter_for_another_family_is_refused(engine: Engine, tiny_models: Path) -> None:
    graph = ip_adapter_graph(tiny_models, "sd15", (("ip-sdxl.safetensors", ("ref-a.png",), 1.0),))
    with pytest.raises(NodeExecutionError, match=r"64-wide text features but the UNet .* has 32"):
        engine.run(graph)


def test_pickles_and_files_without_ip_adapter_tensors_are_refused(engine: Engine, tiny_models: Path) -> None:
    from safetensors.torch import save_file

    images = images_of(engine)
    (images / "ip.bin").write_bytes(b"not read")
    save_file({"proj.weight": torch.zeros(2, 2)}, str(images / "no-ip.safetensors"))
    for name, message in (("ip.bin", "pickle"), ("no-ip.safetensors", "no image_proj or ip_adapter")):
        graph = ip_adapter_graph(tiny_models, "sd15", ((name, ("ref-a.png",), 1.0),))
        with pytest.raises(NodeExecutionError, match=message):
            engine.run(graph)
