"""Attacks on "no stale result" through model files: what a loaded model computes must be what its key names.

Each test compares a long-lived Engine (warm result cache and model manager) with a fresh Engine and a fresh
ModelManager as the oracle. Weight files are changed the ways a user or a second process changes them: copied
over in place (`cp new old` keeps the inode), or renamed into place (`mv`), while a run is under way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from graphflow import Engine, default_registry
from graphflow.context import RunContext
from graphflow.errors import NodeExecutionError
from graphflow.models import ModelManager
from graphflow.models.tiny_depth import write_tiny_dpt
from graphflow.node import Input, Node, Output
from graphflow.types import STRING


def negated(data: bytes) -> bytes:
    """The same safetensors file (same size) with every float32 weight negated."""
    data = bytearray(data)
    start = 8 + int.from_bytes(data[:8], "little")
    for name, tensor in json.loads(data[8:start]).items():
        if name != "__metadata__" and tensor["dtype"] == "F32":
            begin, end = tensor["data_offsets"]
            for sign in range(start + begin + 3, start + end, 4):
                data[sign] ^= 0x80
    return bytes(data)


class CopyOver(Node):
    """Copies `source` over `target` in place (as `cp` does: same inode), then passes `text` on. Stands for a
    second process that copies new weights into a model folder while a run is under way."""

    inputs = (Input("target", STRING), Input("source", STRING), Input("text", STRING))
    outputs = (Output("text", STRING),)

    def run(self, ctx: RunContext, target: str, source: str, text: str) -> dict[str, Any]:
        ctx.input_path(target, "target").write_bytes(Path(source).read_bytes())
        return {"text": text}


def _encode(text: Any) -> dict[str, Any]:
    return {"graphflow": 1, "nodes": {
        "sd": {"type": "CheckpointLoader", "inputs": {"model": "sd"}},
        **({"copy": {"type": "CopyOver", "inputs": text}} if isinstance(text, dict) else {}),
        "enc": {"type": "TextEncode", "inputs": {"clip": {"from": "sd.clip"},
                                                 "text": {"from": "copy.text"} if isinstance(text, dict) else text}},
    }, "outputs": {"embeds": "enc.conditioning"}}


def test_weights_copied_over_in_place_during_a_run_are_not_stored_under_the_old_key(
        tiny_models: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    shutil.copytree(tiny_models / "sd15", inputs / "sd")
    weights = inputs / "sd" / "text_encoder" / "model.safetensors"
    original = weights.read_bytes()
    (tmp_path / "new.safetensors").write_bytes(negated(original))
    registry = default_registry()
    registry.register(CopyOver)
    engine = Engine(registry, input_dirs=[inputs], models=ModelManager())
    engine.run(_encode("warm up"))  # the text encoder is loaded from the original files

    copy = {"target": "sd/text_encoder/model.safetensors", "source": str(tmp_path / "new.safetensors"),
            "text": "a room"}
    # new weights land while the run is under way, after the encoder was loaded (mapped to its file): the node
    # that used it fails instead of storing what the new weights gave under the original files' key
    with pytest.raises(NodeExecutionError, match="changed while they were being read"):
        engine.run(_encode(copy))
    weights.write_bytes(original)  # and the original ones are put back
    again = engine.run(_encode(copy))

    oracle = Engine(registry, input_dirs=[inputs], models=ModelManager()).run(_encode("a room"))
    assert "enc" in again.ran
    assert torch.equal(again.outputs["embeds"].embeds, oracle.outputs["embeds"].embeds)


@pytest.fixture
def depth_inputs(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "photo.png")
    write_tiny_dpt(folder / "dpt")
    return folder


DEPTH = {"graphflow": 1, "nodes": {
    "photo": {"type": "LoadImage", "inputs": {"path": "photo.png"}},
    "depth": {"type": "Depth", "inputs": {"image": {"from": "photo.image"}, "model": "dpt"}},
}, "outputs": {"depth": "depth.image"}}


def test_depth_weights_swapped_while_the_node_loads_them_never_serve_the_old_key(
        depth_inputs: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import nodes.preprocess

    weights = depth_inputs / "dpt" / "model.safetensors"
    (tmp_path / "old").write_bytes(weights.read_bytes())
    (tmp_path / "new").write_bytes(negated(weights.read_bytes()))
    real = nodes.preprocess._load_depth_model
    loads: list[str] = []

    def new_weights_land_first(folder: Path, dtype: str) -> Any:
        loads.append(dtype)
        if len(loads) == 1:
            os.replace(tmp_path / "new", weights)  # `mv`ed into place after the node located the source
        return real(folder, dtype)

    monkeypatch.setattr(nodes.preprocess, "_load_depth_model", new_weights_land_first)
    engine = Engine(input_dirs=[depth_inputs], models=ModelManager())
    with pytest.raises(NodeExecutionError, match="changed while"):
        engine.run(DEPTH)  # refused, rightly: the files changed
    os.replace(tmp_path / "old", weights)  # the old weights are back

    again = engine.run(DEPTH)
    oracle = Engine(input_dirs=[depth_inputs], models=ModelManager()).run(DEPTH)
    assert torch.equal(again.outputs["depth"], oracle.outputs["depth"])


def test_a_disk_cache_shared_by_hosts_where_auto_means_other_dtypes_keeps_their_results_apart(
        depth_inputs: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from graphflow.models import devices

    real = devices.resolve_dtype
    graph = {**DEPTH, "outputs": {"depth": "depth.image"}}
    # the first process stands for a host whose "auto" is half precision (fp16 on CUDA; bf16 runs on this CPU)
    with monkeypatch.context() as host:
        host.setattr(devices, "resolve_dtype", lambda option, device: "bf16" if (option or "auto") == "auto"
                     else real(option, device))
        half = Engine(input_dirs=[depth_inputs], disk_cache=tmp_path / "shared", models=ModelManager()).run(graph)

    here = Engine(input_dirs=[depth_inputs], disk_cache=tmp_path / "shared", models=ModelManager()).run(graph)
    oracle = Engine(input_dirs=[depth_inputs], models=ModelManager()).run(graph)
    assert not torch.equal(half.outputs["depth"], oracle.outputs["depth"])  # the two hosts' results differ
    assert torch.equal(here.outputs["depth"], oracle.outputs["depth"])  # this host must get its own


def test_weights_renamed_into_place_between_runs_rerun_their_users(tiny_models: Path, tmp_path: Path) -> None:
    """Resisted: `mv new old` between runs is a new fingerprint, so the loader and the encoder run again and give
    what a fresh engine gives."""
    inputs = tmp_path / "in"
    shutil.copytree(tiny_models / "sd15", inputs / "sd")
    weights = inputs / "sd" / "text_encoder" / "model.safetensors"
    engine = Engine(input_dirs=[inputs], models=ModelManager())
    before = engine.run(_encode("a room"))
    (tmp_path / "new").write_bytes(negated(weights.read_bytes()))
    os.replace(tmp_path / "new", weights)

    after = engine.run(_encode("a room"))
    oracle = Engine(input_dirs=[inputs], models=ModelManager()).run(_encode("a room"))
    assert sorted(after.ran) == ["enc", "sd"]
    assert torch.equal(after.outputs["embeds"].embeds, oracle.outputs["embeds"].embeds)
    assert not torch.equal(after.outputs["embeds"].embeds, before.outputs["embeds"].embeds)
