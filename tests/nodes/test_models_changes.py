"""Through a real Engine: a model's changed bytes re-run what read them, however the change is disguised; files
changed while weights load fail the node instead of serving new weights under the old key; sources that lead
outside the input roots are refused before anything runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from graphflow import Engine
from graphflow.errors import NodeExecutionError, ValidationError
from graphflow.models import ModelManager
from graphflow.models.sources import ModelChangedError

ENCODER_WEIGHTS = Path("text_encoder") / "model.safetensors"


def _prompt(checkpoint: str) -> dict:
    return {"graphflow": 1, "nodes": {
        "sd": {"type": "CheckpointLoader", "inputs": {"model": checkpoint}},
        "enc": {"type": "TextEncode", "inputs": {"clip": {"from": "sd.clip"}, "text": "a room"}},
    }, "outputs": {"embeds": "enc.conditioning"}}


def _embeds(engine: Engine, checkpoint: str = "sd") -> tuple[torch.Tensor, list[str]]:
    result = engine.run(_prompt(checkpoint))
    return result.outputs["embeds"].embeds, sorted(result.ran)


def _disguised_rewrite(weights: Path) -> None:
    """New weights of the same size (every float32 weight negated, in place) with the old modification time put back."""
    data = bytearray(weights.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    start = 8 + header_size
    for name, tensor in json.loads(data[8:start]).items():
        if name != "__metadata__" and tensor["dtype"] == "F32":
            begin, end = tensor["data_offsets"]
            for sign in range(start + begin + 3, start + end, 4):  # little-endian: the sign bit ends each float
                data[sign] ^= 0x80
    status = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (status.st_size, status.st_mtime_ns)


@pytest.fixture
def checkpoint(tiny_models: Path, tmp_path: Path) -> Path:
    shutil.copytree(tiny_models / "sd15", tmp_path / "sd")
    return tmp_path / "sd"


def test_a_same_size_swap_with_its_time_restored_reruns_the_loader_and_its_users(checkpoint: Path) -> None:
    engine = Engine(input_dirs=[checkpoint.parent], models=ModelManager())
    before, ran = _embeds(engine)
    assert ran == ["enc", "sd"] and _embeds(engine)[1] == []

    _disguised_rewrite(checkpoint / ENCODER_WEIGHTS)

    after, ran = _embeds(engine)
    assert ran == ["enc", "sd"] and not torch.equal(after, before)


def test_a_symlinked_subfolder_inside_the_roots_is_followed_and_its_changes_rerun(checkpoint: Path) -> None:
    shared = checkpoint.parent / "shared" / "text_encoder"
    shared.parent.mkdir()
    (checkpoint / "text_encoder").rename(shared)
    (checkpoint / "text_encoder").symlink_to(shared, target_is_directory=True)
    engine = Engine(input_dirs=[checkpoint.parent], models=ModelManager())
    before, _ = _embeds(engine)

    _disguised_rewrite(shared / "model.safetensors")

    after, ran = _embeds(engine)
    assert ran == ["enc", "sd"] and not torch.equal(after, before)


def test_weights_linked_from_outside_the_roots_are_refused_before_anything_runs(
        checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("elsewhere")
    (checkpoint / ENCODER_WEIGHTS).rename(outside / "model.safetensors")
    (checkpoint / ENCODER_WEIGHTS).symlink_to(outside / "model.safetensors")
    events: list[object] = []
    engine = Engine(input_dirs=[checkpoint.parent], models=ModelManager())

    with pytest.raises(ValidationError) as raised:
        engine.run(_prompt("sd"), on_event=events.append)

    assert raised.value.codes == ["path_outside_root"] and "text_encoder/model.safetensors" in str(raised.value)
    assert not [event for event in events if type(event).__name__ == "NodeStarted"]


@pytest.mark.parametrize(("source", "raised", "says"), [
    ("", NodeExecutionError, "no model source given"), ("  ", NodeExecutionError, "no model source given"),
    (".", ValidationError, "is the input directory"), ("sd/..", ValidationError, "is the input directory"),
])
def test_a_blank_source_or_the_input_directory_itself_is_refused(checkpoint: Path, source: str,
                                                                 raised: type[Exception], says: str) -> None:
    with pytest.raises(raised, match=says):
        Engine(input_dirs=[checkpoint.parent], models=ModelManager()).run(_prompt(source))


@pytest.fixture
def rewritten_while_loading(monkeypatch: pytest.MonkeyPatch, checkpoint: Path) -> list[str]:
    """The first text encoder load is followed at once by a rewrite of its weights, as if a copy were still running
    when the load read them; returns the subfolders loaded."""
    from graphflow.models import loading

    original = loading._from_pretrained
    loaded: list[str] = []

    def load_then_rewrite(class_name: str, folder: str, subfolder: str, dtype: str) -> object:
        model = original(class_name, folder, subfolder, dtype)
        loaded.append(subfolder)
        if loaded.count("text_encoder") == 1 and subfolder == "text_encoder":
            _disguised_rewrite(checkpoint / ENCODER_WEIGHTS)
        return model

    monkeypatch.setattr(loading, "_from_pretrained", load_then_rewrite)
    return loaded


def test_files_changed_while_weights_load_fail_the_node_and_nothing_is_kept_under_the_old_key(
        checkpoint: Path, rewritten_while_loading: list[str]) -> None:
    manager = ModelManager()
    engine = Engine(input_dirs=[checkpoint.parent], models=manager)

    with pytest.raises(NodeExecutionError, match="changed while they were being read") as raised:
        engine.run(_prompt("sd"))
    assert raised.value.node == "enc" and isinstance(raised.value.cause, ModelChangedError)
    assert "text_encoder/model.safetensors" in str(raised.value)
    assert manager.loaded() == [] and sum(manager.loads.values()) == 0

    embeds, ran = _embeds(engine)  # the new files have a new fingerprint: the loader and encoder run again
    assert ran == ["enc", "sd"] and rewritten_while_loading == ["text_encoder", "text_encoder"]
    fresh, _ = _embeds(Engine(input_dirs=[checkpoint.parent], models=ModelManager()))
    assert torch.equal(embeds, fresh)


def test_a_handle_keyed_by_old_files_never_loads_the_new_ones(checkpoint: Path) -> None:
    engine = Engine(input_dirs=[checkpoint.parent], models=ModelManager())
    clip = engine.run({"graphflow": 1, "nodes": {"sd": {"type": "CheckpointLoader", "inputs": {"model": "sd"}}},
                       "outputs": {"clip": "sd.clip"}}).outputs["clip"]
    _disguised_rewrite(checkpoint / ENCODER_WEIGHTS)

    for _ in range(2):  # and a later use tries again, and refuses again
        with pytest.raises(ModelChangedError), clip.encoders[0].use():
            pass
