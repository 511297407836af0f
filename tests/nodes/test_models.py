"""Model loaders: tiny diffusers folders load through the real code, once per process; bad sources say why."""

from __future__ import annotations

from pathlib import Path

import pytest

from graphflow import Engine
from graphflow.errors import NodeExecutionError, ValidationError
from graphflow.models import ModelManager


def _loaders(checkpoint: str, controlnet: str = "controlnet-canny") -> dict:
    return {"graphflow": 1, "nodes": {
        "sd": {"type": "CheckpointLoader", "inputs": {"model": checkpoint}},
        "cn": {"type": "ControlNetLoader", "inputs": {"model": controlnet}},
    }, "outputs": {"model": "sd.model", "clip": "sd.clip", "vae": "sd.vae", "controlnet": "cn.controlnet"}}


def _engine(tiny_models: Path, manager: ModelManager | None = None, **options: str) -> Engine:
    return Engine(input_dirs=[tiny_models], models=manager or ModelManager(), options=options)


def test_sd15_folder_gives_model_clip_and_vae_of_the_sd15_family(tiny_models: Path) -> None:
    outputs = _engine(tiny_models).run(_loaders("sd15")).outputs
    assert outputs["model"].family == "sd15" and outputs["model"].in_channels == 4
    assert len(outputs["clip"].tokenizers) == len(outputs["clip"].encoders) == 1
    assert outputs["vae"].scale == 8
    assert outputs["controlnet"].family == "sd15"


def test_sdxl_and_inpainting_checkpoints_are_recognised(tiny_models: Path) -> None:
    engine = _engine(tiny_models)
    sdxl = engine.run(_loaders("sdxl", "controlnet-sdxl")).outputs
    assert sdxl["model"].family == "sdxl" and sdxl["controlnet"].family == "sdxl"
    assert len(sdxl["clip"].encoders) == 2 and sdxl["clip"].force_zeros_for_empty_prompt
    assert engine.run(_loaders("sd15-inpaint")).outputs["model"].in_channels == 9


def test_two_graphs_and_two_loader_nodes_naming_one_checkpoint_load_it_once(tiny_models: Path) -> None:
    manager = ModelManager()
    first = _loaders("sd15")
    second = {"graphflow": 1, "nodes": {
        "a": {"type": "CheckpointLoader", "inputs": {"model": "sd15"}},
        "b": {"type": "CheckpointLoader", "inputs": {"model": str(tiny_models / "sd15")}},
    }, "outputs": {"a": "a.model", "b": "b.model"}}
    handles = []
    for engine in (_engine(tiny_models, manager), _engine(tiny_models, manager)):
        for document in (first, second):
            for name, value in engine.run(document).outputs.items():
                if name in ("model", "a", "b"):
                    with value.unet.use() as unet:
                        handles.append(unet)
    assert all(unet is handles[0] for unet in handles)
    assert [key.kind for key in manager.loads] == ["unet"]
    assert sum(manager.loads.values()) == 1


def test_weights_load_in_the_dtype_asked_for(tiny_models: Path) -> None:
    import torch

    outputs = _engine(tiny_models, dtype="fp16", device="cpu").run(_loaders("sd15")).outputs
    with outputs["model"].unet.use() as unet:
        assert unet.dtype == torch.float16
    assert outputs["model"].unet.key.dtype == "fp16"


def _failure(tiny_models: Path, source: str, node: str = "CheckpointLoader") -> str:
    document = {"graphflow": 1, "nodes": {"load": {"type": node, "inputs": {"model": source}}},
                "outputs": {"out": "load." + ("controlnet" if node == "ControlNetLoader" else "vae")}}
    with pytest.raises(NodeExecutionError) as raised:
        _engine(tiny_models).run(document)
    assert raised.value.node == "load"
    return str(raised.value)


def test_a_hub_id_missing_from_the_cache_says_where_it_looked_and_how_to_supply_it(tiny_models: Path) -> None:
    message = _failure(tiny_models, "nobody/no-such-model")
    assert "nobody/no-such-model" in message
    assert "HF_HUB_OFFLINE" in message and "Hugging Face cache" in message
    assert str(tiny_models) in message and "--input-dir" in message


def test_pickle_checkpoints_are_refused_before_anything_reads_them(tiny_models: Path, tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"not even read")
    message = _failure(tmp_path, "model.ckpt")
    assert "pickle" in message and "safetensors" in message


def test_a_folder_with_only_pickle_weights_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cn"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_models / "controlnet-canny" / "config.json").read_text())
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"never unpickled")
    assert "pickle" in _failure(tmp_path, "cn", "ControlNetLoader")


def test_a_local_path_outside_the_input_directories_is_refused_before_anything_runs(tiny_models: Path,
                                                                                   tmp_path: Path) -> None:
    document = {"graphflow": 1, "nodes": {"load": {"type": "CheckpointLoader", "inputs": {"model": str(tiny_models)}}},
                "outputs": {"out": "load.vae"}}
    with pytest.raises(ValidationError, match="outside the input directories") as raised:
        _engine(tmp_path / "inside").run(document)
    assert raised.value.codes == ["path_outside_root"]


def test_a_controlnet_folder_is_not_a_checkpoint(tiny_models: Path) -> None:
    assert "model_index.json" in _failure(tiny_models, "controlnet-canny")


def test_a_safetensors_file_that_is_not_a_checkpoint_says_so(tiny_models: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, tmp_path / "odd.safetensors")
    assert "original single-file layout" in _failure(tmp_path, "odd.safetensors")


def test_vae_loader_takes_a_vae_folder_or_a_checkpoints_vae(tiny_models: Path) -> None:
    document = {"graphflow": 1, "nodes": {
        "own": {"type": "VAELoader", "inputs": {"model": "sdxl-vae"}},
        "from_checkpoint": {"type": "VAELoader", "inputs": {"model": "sd15"}},
    }, "outputs": {"own": "own.vae", "from_checkpoint": "from_checkpoint.vae"}}
    outputs = _engine(tiny_models).run(document).outputs
    assert outputs["own"].scaling_factor == pytest.approx(0.13025)
    # a VAE on its own declares no family (fits any model); its scaling factor only hints at precision rules
    assert (outputs["own"].family, outputs["from_checkpoint"].family) == (None, "sd15")
    assert (outputs["own"].precision_family, outputs["from_checkpoint"].precision_family) == ("sdxl", "sd15")
    assert outputs["from_checkpoint"].vae.key.subfolder == "vae"


def test_tiny_sources_build_graphflows_own_models_on_first_use(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHFLOW_TINY_MODELS", str(tmp_path / "tiny"))
    engine = Engine(input_dirs=[tmp_path], models=ModelManager())
    outputs = engine.run(_loaders("tiny:sd15", "tiny:controlnet-canny"))
    assert outputs.outputs["model"].family == "sd15"
    assert (tmp_path / "tiny" / "sd15" / "model_index.json").is_file()
    assert engine.run(_loaders("tiny:sd15", "tiny:controlnet-canny")).ran == []  # building them changed no key
    with pytest.raises(NodeExecutionError, match="tiny:sd15, tiny:sd15-inpaint"):
        Engine(input_dirs=[tmp_path], models=ModelManager()).run(_loaders("tiny:sd3"))


@pytest.mark.parametrize(("node", "tensors"), [
    ("CheckpointLoader", {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3), "cond_stage_model.x": (1,)}),
    ("ControlNetLoader", {"control_model.input_blocks.0.0.weight": (8, 4, 3, 3)}),
])
def test_a_single_file_that_cannot_be_converted_offline_fails_in_its_loader_saying_what_it_needs(
        tmp_path: Path, node: str, tensors: dict[str, tuple[int, ...]]) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({name: torch.zeros(shape) for name, shape in tensors.items()}, tmp_path / "model.safetensors")
    message = _failure(tmp_path, "model.safetensors", node)
    assert "single-file model" in message and "config input" in message


def test_device_and_dtype_can_change_per_run_and_key_the_model_nodes(tiny_models: Path) -> None:
    manager = ModelManager()
    engine = _engine(tiny_models, manager)
    full = engine.run(_loaders("sd15"), options={"dtype": "fp32"})
    half = engine.run(_loaders("sd15"), options={"dtype": "fp16"})
    again = engine.run(_loaders("sd15"), options={"dtype": "fp32"})
    assert sorted(half.ran) == ["cn", "sd"] and again.ran == []
    assert full.outputs["model"].unet.key.dtype == "fp32" and half.outputs["model"].unet.key.dtype == "fp16"
    assert again.outputs["model"] is full.outputs["model"]


def test_replacing_a_folders_weights_reruns_its_loader_and_loads_the_new_weights(tiny_models: Path,
                                                                                tmp_path: Path) -> None:
    import os
    import shutil

    import torch

    shutil.copytree(tiny_models / "controlnet-canny", tmp_path / "cn")
    manager = ModelManager()
    engine = _engine(tmp_path, manager)
    document = {"graphflow": 1, "nodes": {"cn": {"type": "ControlNetLoader", "inputs": {"model": "cn"}}},
                "outputs": {"controlnet": "cn.controlnet"}}

    def weights() -> torch.Tensor:
        with engine.run(document).outputs["controlnet"].controlnet.use() as controlnet:
            return controlnet.controlnet_mid_block.weight.clone()

    before = weights()
    assert engine.run(document).ran == []
    weights_file = tmp_path / "cn" / "diffusion_pytorch_model.safetensors"
    shutil.copyfile(tiny_models / "controlnet-depth" / "diffusion_pytorch_model.safetensors", weights_file)
    os.utime(weights_file, ns=(1, 1))  # a different time even where the clock is coarse
    assert engine.run(document).ran == ["cn"]
    assert not torch.equal(weights(), before)
    assert sum(manager.loads.values()) == 2


def test_replacing_a_single_file_checkpoint_converts_the_new_file(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    from types import SimpleNamespace

    import diffusers
    import torch
    from safetensors.torch import save_file

    from graphflow.models.devices import Placement
    from graphflow.models.loading import load_checkpoint
    from graphflow.models.sources import locate
    from graphflow.paths import PathPolicy

    converted: list[str] = []

    def from_single_file(path: str, **_: object) -> SimpleNamespace:  # diffusers' conversion, which needs the hub
        converted.append(path)
        part = SimpleNamespace(config={"in_channels": 4, "scaling_factor": 0.18215})
        return SimpleNamespace(unet=part, vae=part, text_encoder=part, tokenizer=object(), scheduler=part)

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_single_file", staticmethod(from_single_file))
    paths = PathPolicy.create([tmp_path])
    checkpoint = tmp_path / "model.safetensors"

    def load(value: float) -> str:
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.full((2, 4, 1, 1), value)}, checkpoint)
        os.utime(checkpoint, ns=(1, 1))  # the same size and time every time: only the bytes tell the files apart
        source = locate("model.safetensors", paths, node="sd", input="model", pipeline=True)
        return load_checkpoint(ModelManager(), source, Placement("cpu", "fp32")).model.unet.key.source

    first, same, replaced = load(0.0), load(0.0), load(1.0)
    assert first == same and replaced != first
    assert len(converted) == 2


@pytest.mark.parametrize("weights", ["scannet.pt", "ControlNetHED.pth", "model.safetensors"])
def test_replacing_any_weights_file_of_a_local_folder_changes_its_fingerprint(tmp_path: Path, weights: str) -> None:
    import os

    from graphflow.models.sources import fingerprint, locate
    from graphflow.paths import PathPolicy

    paths = PathPolicy.create([tmp_path])
    (tmp_path / "annotators").mkdir()
    (tmp_path / "annotators" / weights).write_bytes(b"old")

    def keys() -> tuple[str, str]:
        source = locate("annotators", paths, node="n", input="model", files=(weights,))
        return fingerprint("annotators", paths), source.key

    before = keys()
    (tmp_path / "annotators" / weights).write_bytes(b"newer")
    os.utime(tmp_path / "annotators" / weights, ns=(1, 1))
    after = keys()
    assert before[0] != after[0] and before[1] != after[1]


def _config_document(config: str) -> dict:
    return {"graphflow": 1, "nodes": {"cn": {"type": "ControlNetLoader",
                                             "inputs": {"model": "cn.safetensors", "config": config}}},
            "outputs": {"controlnet": "cn.controlnet"}}


@pytest.fixture
def converted_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The config each ControlNet single-file conversion was given (diffusers' conversion needs the hub without one);
    in/cn.safetensors is the file, in/configs/cn a config folder, and a hub repository org/some-controlnet's configs
    are in the Hugging Face cache."""
    from types import SimpleNamespace

    import diffusers
    import torch
    from huggingface_hub import constants
    from safetensors.torch import save_file

    given: list[str | None] = []

    def from_single_file(path: str, config: str | None, **_: object) -> SimpleNamespace:
        given.append(config)
        return SimpleNamespace(config={"addition_embed_type": None})

    monkeypatch.setattr(diffusers.ControlNetModel, "from_single_file", staticmethod(from_single_file))
    (tmp_path / "in" / "configs" / "cn").mkdir(parents=True)
    (tmp_path / "in" / "configs" / "cn" / "config.json").write_text("{}")
    save_file({"weight": torch.zeros(2)}, tmp_path / "in" / "cn.safetensors")
    repository = tmp_path / "hub" / "models--org--some-controlnet"
    (repository / "snapshots" / ("1" * 40)).mkdir(parents=True)
    (repository / "snapshots" / ("1" * 40) / "config.json").write_text("{}")
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("1" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return given


@pytest.mark.parametrize(("config", "expected"), [
    ("configs/cn", "in/configs/cn"), ("org/some-controlnet", "hub/models--org--some-controlnet/snapshots/" + "1" * 40),
    ("", None), ("  ", None)])
def test_the_config_input_is_a_folder_in_the_input_directory_or_a_hub_id_in_the_cache(
        tmp_path: Path, converted_with: list[str | None], config: str, expected: str | None) -> None:
    Engine(input_dirs=[tmp_path / "in"], models=ModelManager()).run(_config_document(config))
    assert converted_with == [str(tmp_path / expected) if expected else None]


def test_a_config_folder_outside_the_input_directories_is_refused_before_anything_runs(
        tmp_path: Path, converted_with: list[str | None]) -> None:
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ValidationError, match="outside the input directories") as raised:
        Engine(input_dirs=[tmp_path / "in"], models=ModelManager()).run(_config_document(str(tmp_path / "elsewhere")))
    assert raised.value.codes == ["path_outside_root"] and converted_with == []


def test_a_changed_config_folder_reruns_the_loader_and_converts_again(tmp_path: Path,
                                                                      converted_with: list[str | None]) -> None:
    engine = Engine(input_dirs=[tmp_path / "in"], models=ModelManager())
    first = engine.run(_config_document("configs/cn")).outputs["controlnet"]
    assert engine.run(_config_document("configs/cn")).ran == []
    (tmp_path / "in" / "configs" / "cn" / "config.json").write_text('{"changed": 1}')
    second = engine.run(_config_document("configs/cn")).outputs["controlnet"]
    assert len(converted_with) == 2  # a new handle: the model key names the config's contents too
    assert second.controlnet is not first.controlnet and second.controlnet.key != first.controlnet.key


def test_a_vae_config_without_force_upcast_is_upcast_in_fp16_as_diffusers_does(tiny_models: Path,
                                                                              tmp_path: Path) -> None:
    import json
    import shutil

    from nodes.latents import needs_upcast

    shutil.copytree(tiny_models / "sdxl-vae", tmp_path / "vae")
    config_file = tmp_path / "vae" / "config.json"
    config = json.loads(config_file.read_text())
    del config["force_upcast"]  # as in configs saved before diffusers 0.19
    config_file.write_text(json.dumps(config))
    document = {"graphflow": 1, "nodes": {"vae": {"type": "VAELoader", "inputs": {"model": "vae"}}},
                "outputs": {"vae": "vae.vae"}}
    vae = _engine(tmp_path, dtype="fp16").run(document).outputs["vae"]
    with vae.vae.use() as module:
        assert module.config.force_upcast is True  # what the SDXL pipelines look at
        assert needs_upcast(vae, module, "sdxl")


@pytest.mark.parametrize("source", ["models/sd--v1", "models/sd..v1"])
def test_a_missing_path_that_cannot_be_a_hub_id_is_reported_as_not_found(tiny_models: Path, source: str) -> None:
    message = _failure(tiny_models, source)
    assert f"model '{source}' was not found: no such file or folder" in message


@pytest.mark.parametrize(("broken", "content"), [
    ("model_index.json", "{not json"), ("scheduler/scheduler_config.json", None), ("unet/config.json", "[1, 2]"),
])
def test_a_malformed_checkpoint_folder_names_the_file_that_is_wrong(tiny_models: Path, tmp_path: Path, broken: str,
                                                                   content: str | None) -> None:
    import shutil

    shutil.copytree(tiny_models / "sd15", tmp_path / "sd")
    if content is None:
        (tmp_path / "sd" / broken).unlink()
    else:
        (tmp_path / "sd" / broken).write_text(content)
    message = _failure(tmp_path, "sd")
    assert "ModelNotFoundError" in message and str(tmp_path / "sd" / broken) in message


def test_a_hub_checkpoint_is_downloaded_once_with_only_its_safetensors_and_configs(
        tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fnmatch
    import shutil

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    remote = tmp_path / "remote"  # what the hub repository holds, pickles and variants included
    shutil.copytree(tiny_models / "sd15", remote)
    (remote / "v1-5-pruned.ckpt").write_bytes(b"pickle")
    (remote / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    snapshot = tmp_path / "cache" / "models--someone--tiny-sd15" / "snapshots" / "abc123"
    calls = []

    def fake_snapshot_download(repo: str, allow_patterns: list[str], local_files_only: bool = False) -> str:
        calls.append((repo, local_files_only))
        if local_files_only and not snapshot.exists():
            raise LocalEntryNotFoundError("not cached")
        for file in remote.rglob("*"):
            relative = file.relative_to(remote).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(relative, pattern) for pattern in allow_patterns):
                (snapshot / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, snapshot / relative)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    document = {"graphflow": 1, "nodes": {"sd": {"type": "CheckpointLoader", "inputs": {"model": "someone/tiny-sd15"}}},
                "outputs": {"model": "sd.model"}}
    model = _engine(tmp_path).run(document).outputs["model"]
    assert model.family == "sd15" and model.source == "someone/tiny-sd15@abc123"
    with model.unet.use() as unet:  # the downloaded files are enough to load from
        assert unet.config.in_channels == 4
    assert calls == [("someone/tiny-sd15", True), ("someone/tiny-sd15", False)]
    assert (snapshot / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(snapshot.rglob("*.ckpt")) and not list(snapshot.rglob("*.bin"))
    _engine(tmp_path).run(document)
    assert calls[2:] == [("someone/tiny-sd15", True)]  # cached now: no second download
