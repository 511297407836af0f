"""LoraLoader -> TextEncode -> Sampler -> VAEDecode gives the pixels of diffusers' pipelines after
`load_lora_weights(...)` + `set_adapters(names, adapter_weights)`, and never changes the modules other graphs share.

The LoRAs are made here: peft LoraConfig layers on the tiny UNet and text encoders, random weights from a seeded
generator, saved with the pipeline's `save_lora_weights` (and one renamed to kohya's key names). Parity rows:
`pytest tests/nodes/test_lora.py -s | grep parity`.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from graphflow import Engine, Graph
from graphflow.errors import NodeExecutionError
from graphflow.models import patches
from graphflow.models.sources import PickleRefusedError
from nodes import (
    CheckpointLoader,
    ControlApply,
    ControlNetLoader,
    LoadImage,
    LoraLoader,
    Sampler,
    TextEncode,
    VAEDecode,
)
from tests.nodes.sampling_graphs import (
    CANNY,
    PROMPT,
    SEED,
    SIZE,
    STEPS,
    Control,
    Pipelines,
    compare,
    images_of,
    make_engine,
)

pytest.importorskip("peft")

Lora = tuple[Path, float, float]  # file, strength_model, strength_clip
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PIPELINES = {("sd15", False): "StableDiffusionPipeline", ("sd15", True): "StableDiffusionControlNetPipeline",
             ("sdxl", False): "StableDiffusionXLPipeline"}


def make_lora(tiny_models: Path, checkpoint: str, folder: Path, seed: int, rank: int = 4, alpha: float = 8.0,
              text: bool = True, peft_names: bool = False) -> Path:
    """A LoRA on the checkpoint's UNet (and text encoders) saved as diffusers' training scripts save them (their
    names converted to diffusers' ...lora.down.weight), or with `peft_names` as peft names them (...lora_A.weight)."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipeline_class = getattr(diffusers, PIPELINES[checkpoint, False])
    options = {"safety_checker": None, "requires_safety_checker": False} if checkpoint == "sd15" else {}
    pipeline = pipeline_class.from_pretrained(tiny_models / checkpoint, **options)
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, Any] = {}
    encoders = [("text_encoder", pipeline.text_encoder)] + \
        ([("text_encoder_2", pipeline.text_encoder_2)] if checkpoint == "sdxl" and text else [])
    for name, module, targets in [("unet", pipeline.unet, UNET_TARGETS)] + \
            [(name, encoder, TEXT_TARGETS) for name, encoder in (encoders if text else [])]:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), module)
        state = get_peft_model_state_dict(module)
        with torch.no_grad():
            for tensor in state.values():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
        state = get_peft_model_state_dict(module)
        layers[f"{name}_lora_layers"] = state if peft_names else convert_state_dict_to_diffusers(state)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(folder, weight_name="lora.safetensors", **layers)
    return folder / "lora.safetensors"


def kohya_copy(lora: Path, target: Path, alpha: float = 8.0) -> Path:
    """The same LoRA with kohya's (A1111's) names: lora_unet_..., lora_te_text_model_..., lora_down/lora_up, alpha."""
    from safetensors.torch import load_file, save_file

    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(lora).items():
        found = re.fullmatch(r"(unet|text_encoder)\.(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight", key)
        assert found, key
        part, module, direction = found.groups()
        name = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}[part] + module.replace(".", "_")
        renamed[f"{name}.lora_{direction}.weight"] = tensor
        renamed[f"{name}.alpha"] = torch.tensor(alpha)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(renamed, target)
    return target


@pytest.fixture(scope="module")
def loras(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LoRA files inside the engine's input root (tiny_models is one), by name."""
    root = tiny_models / "loras"
    made = {"sd15-a": make_lora(tiny_models, "sd15", root / "sd15-a", 1),
            "sd15-b": make_lora(tiny_models, "sd15", root / "sd15-b", 2, rank=2, alpha=2.0),
            "sdxl-a": make_lora(tiny_models, "sdxl", root / "sdxl-a", 3),
            "sdxl-b": make_lora(tiny_models, "sdxl", root / "sdxl-b", 4, rank=2, alpha=3.0, peft_names=True)}
    made["sd15-kohya"] = kohya_copy(made["sd15-a"], root / "sd15-kohya" / "kohya.safetensors")
    return made


@pytest.fixture(scope="module")
def engine(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return make_engine(tiny_models, tmp_path_factory.mktemp("lora"))


def lora_graph(tiny_models: Path, checkpoint: str, chain: list[Lora], controls: tuple[Control, ...] = (),
               seed: int = SEED) -> Graph:
    """CheckpointLoader -> LoraLoader x len(chain) -> TextEncode -> (ControlApply) -> Sampler -> VAEDecode."""
    graph = Graph("lora")
    sd = graph.add(CheckpointLoader(model=str(tiny_models / checkpoint)), "sd")
    model, clip = sd.model, sd.clip
    for index, (file, strength_model, strength_clip) in enumerate(chain):
        node = graph.add(LoraLoader(model=model, clip=clip, lora=str(file), strength_model=strength_model,
                                    strength_clip=strength_clip), f"lora{index}")
        model, clip = node.model, node.clip
    positive = graph.add(TextEncode(clip=clip, text=PROMPT), "positive")
    inputs: dict[str, Any] = {"model": model, "positive": positive.conditioning, "seed": seed, "steps": STEPS}
    if controls:
        inputs["control"] = [ControlApply(controlnet=ControlNetLoader(model=str(tiny_models / c.model)).controlnet,
                                          image=LoadImage(path=c.image).image, scale=c.scale).control
                             for c in controls]
    else:
        inputs.update(width=SIZE, height=SIZE)
    sampled = graph.add(Sampler(**inputs), "sampler")
    graph.output("image", graph.add(VAEDecode(vae=sd.vae, latent=sampled.latent), "decode").image)
    return graph


def diffusers_image(tiny_models: Path, images: Path, checkpoint: str, chain: list[Lora],
                    controls: tuple[Control, ...] = (), seeds: tuple[int, ...] = (SEED,)) -> np.ndarray:
    """A fresh diffusers pipeline with `pipe.load_lora_weights(file)` for each LoRA, then
    `pipe.set_adapters(names, adapter_weights=[{"unet": strength_model, "text_encoder": strength_clip, ...}])`;
    its image for SEED, or a list of them for `seeds`."""
    import diffusers
    import transformers.integrations.peft as transformers_peft

    pipeline_class = getattr(diffusers, PIPELINES[checkpoint, bool(controls)])
    options: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False} if checkpoint == "sd15" \
        else {}
    if controls:
        options["controlnet"] = diffusers.ControlNetModel.from_pretrained(tiny_models / controls[0].model)
    pipeline = pipeline_class.from_pretrained(tiny_models / checkpoint, **options)
    pipeline.set_progress_bar_config(disable=True)
    names = [f"lora{index}" for index in range(len(chain))]
    with pytest.MonkeyPatch.context() as patch:
        if _peft_older_than(transformers_peft.MIN_PEFT_VERSION):
            # transformers 5.24 asks for peft >= 0.22 (PyPI's newest is 0.21) with the very code 5.23 ran on >= 0.20:
            # the reference is diffusers' own load_lora_weights, so it may use that code here
            patch.setattr(transformers_peft, "check_peft_version", lambda min_version: None)
        for name, (file, _, _) in zip(names, chain, strict=True):
            pipeline.load_lora_weights(file.parent, weight_name=file.name, adapter_name=name)
    if chain:
        weights = [{part: strength_model if part == "unet" else strength_clip
                    for part in pipeline._lora_loadable_modules} for _, strength_model, strength_clip in chain]
        pipeline.set_adapters(names, adapter_weights=weights)
    arguments = {} if controls else {"height": SIZE, "width": SIZE}
    runs = Pipelines(tiny_models, images)
    found = [runs.run(pipeline, controls, seed=seed, **arguments) for seed in seeds]
    return found[0] if seeds == (SEED,) else found


def _peft_older_than(version: str) -> bool:
    from packaging.version import Version

    return Version(importlib.metadata.version("peft")) < Version(version)


def assert_same_pixels(case: str, ours: torch.Tensor, theirs: np.ndarray) -> None:
    difference, same = compare(case, ours, theirs)
    assert same, f"{case}: uint8 images differ (max abs diff {difference:.3g})"
    assert difference == 0.0, f"{case}: float images differ by up to {difference:.3g}"


def module_state(module: torch.nn.Module) -> list[Any]:
    """Everything a patch could leave behind: the module tree (by object), each parameter and buffer (object,
    storage, dtype, device, requires_grad) and the module's own attributes."""
    tensors = [(name, id(tensor), tensor.data_ptr(), tensor.dtype, tensor.device, tensor.requires_grad)
               for name, tensor in [*module.named_parameters(), *module.named_buffers()]]
    return [[(name, id(sub)) for name, sub in module.named_modules()], tensors,
            {name: id(value) for name, value in module.__dict__.items()}]


CASES = [
    ("SD1.5, 1 LoRA", "sd15", [("sd15-a", 1.0, 1.0)], ()),
    ("SD1.5, 1 LoRA, model 0.7 / clip 0.4", "sd15", [("sd15-a", 0.7, 0.4)], ()),
    ("SD1.5, 2 LoRAs, 0.8/0.3 + 0.5/1.2", "sd15", [("sd15-a", 0.8, 0.3), ("sd15-b", 0.5, 1.2)], ()),
    ("SD1.5 + ControlNet, 1 LoRA, model 0.9 / clip 0.6", "sd15", [("sd15-a", 0.9, 0.6)], (CANNY,)),
    ("SD1.5, kohya key names, model 0.8 / clip 0.5", "sd15", [("sd15-kohya", 0.8, 0.5)], ()),
    ("SD1.5, negative strengths -0.6 / -1.5", "sd15", [("sd15-a", -0.6, -1.5)], ()),
    ("SDXL, 1 LoRA", "sdxl", [("sdxl-a", 1.0, 1.0)], ()),
    ("SDXL, 1 LoRA, model 0.6 / clip 1.3", "sdxl", [("sdxl-a", 0.6, 1.3)], ()),
    ("SDXL, 2 LoRAs, 0.8/0.3 + 0.5/1.2", "sdxl", [("sdxl-a", 0.8, 0.3), ("sdxl-b", 0.5, 1.2)], ()),
]


_BASES: dict[tuple[str, tuple[Control, ...]], np.ndarray] = {}  # diffusers' images without LoRA


@pytest.mark.parametrize(("case", "checkpoint", "chain", "controls"), CASES, ids=[case[0] for case in CASES])
def test_loras_give_the_pixels_of_diffusers_load_lora_weights_and_set_adapters(
        case: str, checkpoint: str, chain: list[tuple[str, float, float]], controls: tuple[Control, ...],
        engine: Engine, tiny_models: Path, loras: dict[str, Path]) -> None:
    files = [(loras[name], strength_model, strength_clip) for name, strength_model, strength_clip in chain]
    theirs = diffusers_image(tiny_models, images_of(engine), checkpoint, files, controls)
    key = (checkpoint, controls)
    if key not in _BASES:
        _BASES[key] = diffusers_image(tiny_models, images_of(engine), checkpoint, [], controls)
    assert not np.array_equal(theirs, _BASES[key]), "the test LoRA changes nothing"
    assert_same_pixels(case, engine.run(lora_graph(tiny_models, checkpoint, files, controls)).outputs["image"], theirs)


def test_the_text_encoder_part_counts_and_strength_clip_alone_changes_the_image(
        engine: Engine, tiny_models: Path, loras: dict[str, Path]) -> None:
    one, other = ([(loras["sd15-a"], 0.7, clip)] for clip in (0.4, 0.0))
    first, second = (engine.run(lora_graph(tiny_models, "sd15", chain)).outputs["image"] for chain in (one, other))
    assert not torch.equal(first, second)
    assert_same_pixels("SD1.5, model 0.7 / clip 0 (UNet part only)", second,
                       diffusers_image(tiny_models, images_of(engine), "sd15", other))


def test_strength_zero_for_both_gives_the_base_pixels(engine: Engine, tiny_models: Path,
                                                      loras: dict[str, Path]) -> None:
    ours = engine.run(lora_graph(tiny_models, "sd15", [(loras["sd15-a"], 0.0, 0.0)])).outputs["image"]
    assert_same_pixels("SD1.5, strengths 0 / 0 (left out)", ours,
                       diffusers_image(tiny_models, images_of(engine), "sd15", []))


def test_graphs_with_and_without_a_lora_share_one_base_model_which_stays_unchanged(
        tiny_models: Path, tmp_path: Path, loras: dict[str, Path]) -> None:
    engine = make_engine(tiny_models, tmp_path)
    chain = [(loras["sd15-a"], 0.8, 0.5)]
    plain, patched = lora_graph(tiny_models, "sd15", []), lora_graph(tiny_models, "sd15", chain)
    base, with_lora = (diffusers_image(tiny_models, images_of(engine), "sd15", c) for c in ([], chain))
    assert_same_pixels("one Engine: graph without LoRA, first", engine.run(plain).outputs["image"], base)
    keys = {key.kind: key for key in engine.models.loaded() if key.kind in ("unet", "text_encoder")}
    before = {kind: _held(engine, key, module_state) for kind, key in keys.items()}
    outputs = _held(engine, keys["unet"], _unet_output), _held(engine, keys["text_encoder"], _encoder_output)
    assert_same_pixels("one Engine: graph with LoRA", engine.run(patched).outputs["image"], with_lora)
    assert {kind: _held(engine, key, module_state) for kind, key in keys.items()} == before
    assert torch.equal(_held(engine, keys["unet"], _unet_output), outputs[0])
    assert torch.equal(_held(engine, keys["text_encoder"], _encoder_output), outputs[1])
    assert_same_pixels("one Engine: graph without LoRA, after", engine.run(lora_graph(
        tiny_models, "sd15", [], seed=SEED + 1)).outputs["image"],
        diffusers_image(tiny_models, images_of(engine), "sd15", [], seeds=(SEED + 1,))[0])
    assert set(engine.models.loads.values()) == {1}  # the checkpoint's models and the LoRA, each loaded once
    assert sorted(key.kind for key in engine.models.loads) == ["sd15 lora", "text_encoder", "unet", "vae"]


def _held(engine: Engine, key: Any, look: Any) -> Any:
    """`look(module)` for the loaded model of `key`, held as a node holds it, without patches."""
    with patches.patched(engine.models.handle(key, lambda: None), (), "any") as module:
        return look(module)


def _encoder_output(encoder: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return encoder(torch.arange(2, 40).unsqueeze(0)).last_hidden_state


def _unet_output(unet: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((1, 4, 8, 8), generator=generator)
    context = torch.randn((1, 77, unet.config.cross_attention_dim), generator=generator)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context).sample


def test_a_patched_and_an_unpatched_graph_sampling_at_once_in_threads_both_match(
        tiny_models: Path, tmp_path: Path, loras: dict[str, Path]) -> None:
    engine = make_engine(tiny_models, tmp_path)
    chains = {"plain": [], "lora": [(loras["sd15-a"], 0.8, 0.5), (loras["sd15-b"], 0.5, 1.2)]}
    seeds = (11, 12)
    theirs = {name: diffusers_image(tiny_models, images_of(engine), "sd15", chain, seeds=seeds)
              for name, chain in chains.items()}
    results: dict[str, list[torch.Tensor]] = {name: [] for name in chains}
    errors: list[BaseException] = []
    start = threading.Barrier(len(chains))

    def render(name: str) -> None:
        try:
            start.wait()
            for seed in seeds:
                graph = lora_graph(tiny_models, "sd15", chains[name], seed=seed)
                results[name].append(engine.run(graph).outputs["image"])
        except BaseException as error:  # reported below, in the test's own thread
            errors.append(error)

    threads = [threading.Thread(target=render, args=(name,)) for name in chains]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for name, images in results.items():
        for seed, image, expected in zip(seeds, images, theirs[name], strict=True):
            assert_same_pixels(f"threads: {name} graph beside the other, seed {seed}", image, expected)


def test_a_changed_strength_reruns_what_it_reaches_and_a_strength_change_reuses_the_injected_layers(
        engine: Engine, tiny_models: Path, loras: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    lora = loras["sd15-b"]
    engine.run(lora_graph(tiny_models, "sd15", [(lora, 0.3, 0.2)]))
    injections = []
    real_inject = patches._inject
    monkeypatch.setattr(patches, "_inject", lambda *args: injections.append(args[1]) or real_inject(*args))
    result = engine.run(lora_graph(tiny_models, "sd15", [(lora, 0.4, 0.2)]))
    assert sorted(result.ran) == ["decode", "lora0", "positive", "sampler"]  # LoraLoader's key holds both strengths
    assert injections == []  # the same LoRA in the same modules: only the strengths are set again
    assert_same_pixels("SD1.5, kept LoRA layers, strength_model 0.3 -> 0.4", result.outputs["image"],
                       diffusers_image(tiny_models, images_of(engine), "sd15", [(lora, 0.4, 0.2)]))
    assert engine.run(lora_graph(tiny_models, "sd15", [(lora, 0.4, 0.2)])).ran == []


def test_a_changed_lora_file_reruns_its_loader_and_users(tiny_models: Path, tmp_path: Path,
                                                         loras: dict[str, Path]) -> None:
    engine = make_engine(tiny_models, tmp_path)
    file = images_of(engine) / "lora.safetensors"
    shutil.copy(loras["sd15-a"], file)
    chain = [(file, 0.8, 0.5)]
    before = engine.run(lora_graph(tiny_models, "sd15", chain))
    assert engine.run(lora_graph(tiny_models, "sd15", chain)).ran == []
    _negate_up_weights(file)  # the same size and modification time, other weights
    after = engine.run(lora_graph(tiny_models, "sd15", chain))
    assert sorted(after.ran) == ["decode", "lora0", "positive", "sampler"]
    assert not torch.equal(after.outputs["image"], before.outputs["image"])
    assert_same_pixels("SD1.5, rewritten LoRA file", after.outputs["image"],
                       diffusers_image(tiny_models, images_of(engine), "sd15", chain))


def _negate_up_weights(file: Path) -> None:
    """Every lora_up (B) weight negated in place, the file's size and modification time kept (negating A and B
    both would leave B @ A, and so the images, as they were)."""
    import json
    import os

    data = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    for name, tensor in json.loads(data[8:start]).items():
        if ".up." in name and tensor["dtype"] == "F32":
            begin, end = tensor["data_offsets"]
            for sign in range(start + begin + 3, start + end, 4):  # little-endian: the sign bit ends each float
                data[sign] ^= 0x80
    status = file.stat()
    file.write_bytes(bytes(data))
    os.utime(file, ns=(status.st_atime_ns, status.st_mtime_ns))


@pytest.mark.parametrize("name", ["lora.bin", "lora.pt", "lora.ckpt"])
def test_pickle_loras_are_refused_unread(name: str, engine: Engine, tiny_models: Path, tmp_path: Path) -> None:
    file = images_of(engine) / name
    file.write_bytes(b"not to be unpickled")
    with pytest.raises(NodeExecutionError) as failed:
        engine.run(lora_graph(tiny_models, "sd15", [(file, 1.0, 1.0)]))
    assert isinstance(failed.value.__cause__, PickleRefusedError)


def test_a_safetensors_file_that_is_no_lora_is_refused_in_the_loader(engine: Engine, tiny_models: Path) -> None:
    weights = tiny_models / "sd15" / "vae" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(NodeExecutionError, match="not a LoRA") as failed:
        engine.run(lora_graph(tiny_models, "sd15", [(weights, 1.0, 1.0)]))
    assert failed.value.node == "lora0"


def test_an_sdxl_lora_on_sd15_fails_in_its_user_and_leaves_the_module_as_it_was(
        tiny_models: Path, tmp_path: Path, loras: dict[str, Path]) -> None:
    engine = make_engine(tiny_models, tmp_path)
    base = diffusers_image(tiny_models, images_of(engine), "sd15", [])
    with pytest.raises(NodeExecutionError, match="does not fit"):
        engine.run(lora_graph(tiny_models, "sd15", [(loras["sdxl-a"], 1.0, 0.0)]))
    assert_same_pixels("SD1.5 after a failed SDXL LoRA", engine.run(lora_graph(tiny_models, "sd15", [])).outputs[
        "image"], base)


def test_a_lora_folder_gives_its_one_safetensors_file(engine: Engine, tiny_models: Path,
                                                      loras: dict[str, Path]) -> None:
    by_file = engine.run(lora_graph(tiny_models, "sd15", [(loras["sd15-b"], 0.5, 0.5)])).outputs["image"]
    by_folder = engine.run(lora_graph(tiny_models, "sd15", [(loras["sd15-b"].parent, 0.5, 0.5)])).outputs["image"]
    assert torch.equal(by_file, by_folder)


def test_a_model_and_clip_of_different_families_are_refused_by_name(tiny_models: Path) -> None:
    from graphflow.models.manager import ModelManager

    document = {"graphflow": 1, "nodes": {
        "sd": {"type": "CheckpointLoader", "inputs": {"model": "sd15"}},
        "xl": {"type": "CheckpointLoader", "inputs": {"model": "sdxl"}},
        "lora": {"type": "LoraLoader", "inputs": {"model": {"from": "sd.model"}, "clip": {"from": "xl.clip"},
                                                   "lora": "missing.safetensors"}}},
        "outputs": {"model": "lora.model"}}
    engine = Engine(input_dirs=[tiny_models], models=ModelManager())
    with pytest.raises(NodeExecutionError, match=r"model is SD1\.5 but clip is SDXL"):
        engine.run(document)
