"""`graphflow run image.png` and `rerun_png`: a PNG from SaveImage runs its workflow again, self-contained (templates
inlined), to the same pixels; `--set` overrides its params; what differs from when it was made is a warning; a PNG
without a workflow (or with a broken or hostile one) is a clear error, never evaluated."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import graphflow
from graphflow import Engine
from graphflow.cli import main
from graphflow.document import dumps
from graphflow.inline import inline_templates
from graphflow.models import ModelManager
from graphflow.planning import plan_run
from graphflow.rerun import RerunWarning, read_png, rerun_options

_MODELS = ModelManager()  # shared by this module's tests: each tiny model loads once

TEMPLATE = {
    "graphflow": 1,
    "name": "render",
    "params": {
        "checkpoint": {"type": "STRING", "default": "tiny:sd15"},
        "prompt": {"type": "STRING", "default": "a quiet harbour"},
        "seed": {"type": "INT", "default": 0},
        "steps": {"type": "INT", "default": 2, "min": 1, "max": 50},
    },
    "nodes": {
        "sd": {"type": "CheckpointLoader", "inputs": {"model": {"param": "checkpoint"}}},
        "text": {"type": "TextEncode", "inputs": {"clip": {"from": "sd.clip"}, "text": {"param": "prompt"}}},
        "sample": {"type": "Sampler", "inputs": {
            "model": {"from": "sd.model"}, "positive": {"from": "text.conditioning"}, "seed": {"param": "seed"},
            "steps": {"param": "steps"}, "cfg": 3.0, "width": 32, "height": 32}},
        "decode": {"type": "VAEDecode", "inputs": {"vae": {"from": "sd.vae"}, "latent": {"from": "sample.latent"}}},
    },
    "outputs": {"image": "decode.image"},
}
GRAPH = {
    "graphflow": 1,
    "name": "harbour",
    "params": {"seed": {"type": "INT", "default": 3}, "prompt": {"type": "STRING", "default": "a red boat"}},
    "nodes": {
        # an id that the inlined "render" nodes would take: they must step aside
        "render__sd": {"type": "Int", "inputs": {"value": 1}},
        "render": {"template": "parts/render.json",
                   "inputs": {"prompt": {"param": "prompt"}, "seed": {"param": "seed"}}},
        "save": {"type": "SaveImage", "inputs": {"image": {"from": "render.image"}, "prefix": "harbour"}},
    },
    "outputs": {"image": "render.image", "one": "render__sd.value"},
}


@pytest.fixture(scope="module")
def first_png(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Path:
    """A PNG written by `graphflow run` of GRAPH (a template node and params), made once for the module."""
    folder = tmp_path_factory.mktemp("made")
    (folder / "graphs" / "parts").mkdir(parents=True)
    (folder / "graphs" / "parts" / "render.json").write_text(dumps(TEMPLATE))
    (folder / "graphs" / "harbour.json").write_text(dumps(GRAPH))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRAPHFLOW_TINY_MODELS", str(tiny_models))
        patch.chdir(folder)
        assert main(["run", "graphs/harbour.json", "--out", "first", "--quiet"]) == 0
    return _only_png(folder / "first")


@pytest.fixture
def made(first_png: Path, tmp_path: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of that PNG in tmp_path/"first", the current directory; the template files are not there."""
    monkeypatch.setenv("GRAPHFLOW_TINY_MODELS", str(tiny_models))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "first").mkdir()
    return Path(shutil.copy(first_png, tmp_path / "first"))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def _only_png(folder: Path) -> Path:
    (png,) = folder.glob("*.png")
    return png


def _rewrite(source: Path, target: Path, **chunks: str | None) -> Path:
    """A copy of PNG `source` with these text chunks replaced (None: left out), the pixels kept."""
    with Image.open(source) as picture:
        text = {key: value for key, value in picture.info.items() if isinstance(value, str)}
        pixels = np.asarray(picture.convert("RGB"))
    info = PngImagePlugin.PngInfo()
    for key, value in {**text, **chunks}.items():
        if value is not None:
            info.add_text(key, value)
    Image.fromarray(pixels).save(target, pnginfo=info)
    return target


def test_the_png_reruns_its_template_graph_elsewhere_to_the_same_pixels(made: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy = Path(shutil.copy(made, elsewhere / "copy.png"))  # self-contained: no template file is anywhere near
    capsys.readouterr()

    assert main(["run", str(copy), "--out", "second", "--quiet"]) == 0

    assert "warning" not in capsys.readouterr().err  # same machine, same models: nothing differs
    again = _only_png(tmp_path / "second")
    np.testing.assert_array_equal(_pixels(again), _pixels(made))
    assert read_png(again).document == read_png(made).document  # and it embeds the same workflow again

    result = graphflow.rerun_png(copy, engine=Engine(output_dir=tmp_path / "third", models=_MODELS))
    np.testing.assert_array_equal(_pixels(result.files[0]), _pixels(made))
    assert result.outputs["one"] == 1


def test_the_png_records_the_inlined_document_params_versions_models_and_placement(made: Path,
                                                                                   tiny_models: Path) -> None:
    workflow = read_png(made)

    nodes = workflow.document["nodes"]
    assert list(nodes) == ["render__sd", "render__sd-2", "render__text", "render__sample", "render__decode", "save"]
    assert nodes["render__sample"]["inputs"]["seed"] == {"param": "seed"}  # the outer param, still --set-able
    assert nodes["render__sample"]["inputs"]["steps"] == 2  # the template's default, now a literal
    assert nodes["render__text"]["inputs"]["clip"] == {"from": "render__sd-2.clip"}
    assert nodes["save"]["inputs"]["image"] == {"from": "render__decode.image"}
    assert workflow.document["outputs"] == {"image": "render__decode.image", "one": "render__sd.value"}
    assert workflow.params == {"seed": 3, "prompt": "a red boat"}
    assert {"graphflow", "torch", "diffusers", "transformers"} <= workflow.versions.keys()
    assert workflow.versions["diffusers"] is not None and workflow.versions["transformers"] is not None
    assert workflow.device in ("cpu", "cuda", "mps") and workflow.dtype in ("fp32", "fp16")
    assert list(workflow.models) == ["tiny:sd15"] and len(workflow.models["tiny:sd15"]) >= 16
    with Image.open(made) as picture:
        assert json.loads(picture.info["run"])["seeds"] == {"render/sample": [3]}


def test_set_overrides_the_recorded_seed(made: Path, tmp_path: Path) -> None:
    assert main(["run", str(made), "--out", "seed4", "--set", "seed=4", "--quiet"]) == 0

    changed = _only_png(tmp_path / "seed4")
    assert not np.array_equal(_pixels(changed), _pixels(made))
    assert read_png(changed).params == {"seed": 4, "prompt": "a red boat"}
    assert main(["run", str(made), "--out", "bad", "--set", "sed=4"]) == 1  # still checked against its params


def test_what_differs_from_when_it_was_made_is_a_warning_not_a_failure(made: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with Image.open(made) as picture:
        versions, run = json.loads(picture.info["versions"]), json.loads(picture.info["run"])
    versions["torch"] = "0.0.1"
    run["models"]["tiny:sd15"] = "0" * 32
    older = _rewrite(made, tmp_path / "older.png", versions=json.dumps(versions), run=json.dumps(run))
    capsys.readouterr()

    assert main(["run", str(older), "--out", "warned", "--quiet"]) == 0

    err = capsys.readouterr().err
    assert "warning: older.png was made with torch 0.0.1" in err
    assert "warning: model 'tiny:sd15' of older.png has other files here" in err
    np.testing.assert_array_equal(_pixels(_only_png(tmp_path / "warned")), _pixels(made))
    with pytest.warns(RerunWarning, match="torch 0.0.1"):
        graphflow.rerun_png(older, engine=Engine(output_dir=tmp_path / "warned2", models=_MODELS))


def _stopped(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["run", str(path), "--quiet"]) == 1
    return capsys.readouterr().err


def test_a_png_without_a_workflow_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    assert "holds no graphflow workflow" in _stopped(plain, capsys)

    comfy = _rewrite(plain, tmp_path / "comfy.png", prompt=json.dumps({"3": {"class_type": "KSampler", "inputs": {}}}))
    assert "was written by ComfyUI (it has a 'prompt' text chunk" in _stopped(comfy, capsys)

    (tmp_path / "fake.png").write_text('{"graphflow": 1}')
    assert "is not a PNG file" in _stopped(tmp_path / "fake.png", capsys)
    assert "no file at" in _stopped(tmp_path / "missing.png", capsys)


HOSTILE: dict[str, dict[str, str]] = {
    "document not JSON": {"graphflow": '{"graphflow": 1, "nodes": {'},
    "document not an object": {"graphflow": "[1, 2]"},
    "document nested 100 000 deep": {"graphflow": '{"graphflow": 1, "nodes": ' + "[" * 100_000 + "]" * 100_000 + "}"},
    "document naming code": {"graphflow": json.dumps({"graphflow": 1, "nodes": {
        "x": {"type": "__import__('os').system('touch pwned')", "inputs": {}}}})},
    "params not JSON": {"params": "{'seed': 1}"},
    "params not an object": {"params": "[1]"},
    "params nested too deep": {"params": '{"seed": ' + "[" * 100 + "]" * 100 + "}"},
    "params with an undeclared name": {"params": '{"eval": "1 + 1"}'},
    "params of the wrong type": {"params": '{"seed": "3; rm -rf /"}'},
}


@pytest.mark.parametrize("chunks", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_text_chunks_are_refused_as_data(made: Path, tmp_path: Path, chunks: dict[str, str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    hostile = _rewrite(made, tmp_path / "hostile.png", **chunks)
    capsys.readouterr()

    err = _stopped(hostile, capsys)

    assert "hostile.png" in err and "Traceback" not in err
    assert not (tmp_path / "pwned").exists()


def test_a_huge_or_bomb_text_chunk_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (4, 4)).save(bomb)
    data = bomb.read_bytes()
    body = b"graphflow\0\0" + zlib.compress(b" " * (64 << 20), 9)  # a zTXt chunk inflating to 64 MiB
    chunk = len(body).to_bytes(4, "big") + b"zTXt" + body + zlib.crc32(b"zTXt" + body).to_bytes(4, "big")
    bomb.write_bytes(data[:33] + chunk + data[33:])  # after the 8-byte signature and the 25-byte IHDR chunk

    err = _stopped(bomb, capsys)

    assert "bomb.png is not a readable PNG" in err and "too large" in err.lower()


def _keys(engine: Engine, graph: Any) -> list[tuple[str, str]]:
    """(node type, cache key) of each node but the output nodes, whose keys hold the document they embed."""
    compiled = engine.compile(graph)
    targets = list(dict.fromkeys([*(link.node for link in compiled.outputs.values()), *compiled.output_nodes()]))
    keys = plan_run(compiled, targets, {}, engine.paths).keys
    return sorted((compiled.nodes[node].node_type.type_name, key) for node, key in keys.items()
                  if not compiled.nodes[node].node_type.is_output)


@pytest.mark.parametrize("example", ["demo.json", "archviz_four_seeds.json"])
def test_inlining_the_examples_keeps_every_cache_key(example: str, tiny_models: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHFLOW_TINY_MODELS", str(tiny_models))
    graphs = Path(__file__).parents[2] / "graphs"
    engine = Engine(input_dirs=[graphs], models=_MODELS)
    compiled = engine.compile(graphs / example)
    assert compiled.template_documents  # it uses templates

    inlined = inline_templates(compiled.document, compiled.base_dir, compiled.template_documents,
                               compiled.template_references)

    assert not any("template" in entry for entry in inlined["nodes"].values())
    assert _keys(engine, inlined) == _keys(engine, graphs / example)  # the same computation, node for node



def test_inlined_template_file_paths_are_rebased_onto_the_outer_folder(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    Image.new("RGB", (8, 8), "red").save(parts / "photo.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "outer.png")
    (parts / "pair.json").write_text(dumps({
        "graphflow": 1,
        "params": {"second": {"type": "STRING", "default": "photo.png"}},  # a default written here: parts/
        "nodes": {"first": {"type": "LoadImage", "inputs": {"path": "photo.png"}},
                  "second": {"type": "LoadImage", "inputs": {"path": {"param": "second"}}},
                  "name": {"type": "String", "inputs": {"value": "photo.png"}}},  # no file: stays as written
        "outputs": {"first": "first.image", "second": "second.image", "name": "name.value"}}))
    outer = {"graphflow": 1, "nodes": {
        "default": {"template": "parts/pair.json"},
        "given": {"template": "parts/pair.json", "inputs": {"second": "outer.png"}}},  # written here: as it is
        "outputs": {"a": "default.second", "b": "given.second", "c": "default.name"}}
    (tmp_path / "outer.json").write_text(dumps(outer))
    engine = Engine(input_dirs=[tmp_path], models=_MODELS)
    compiled = engine.compile(tmp_path / "outer.json")
    registry = engine.registry

    inlined = inline_templates(compiled.document, compiled.base_dir, compiled.template_documents,
                               compiled.template_references,
                               lambda name: {spec.name for spec in registry.get(name).inputs if spec.file})

    paths = {node: entry["inputs"].get("path") for node, entry in inlined["nodes"].items()}
    assert paths == {"default__first": "parts/photo.png", "default__second": "parts/photo.png",
                     "default__name": None, "given__first": "parts/photo.png", "given__second": "outer.png",
                     "given__name": None}
    assert inlined["nodes"]["default__name"]["inputs"]["value"] == "photo.png"
    assert _keys(engine, inlined) == _keys(engine, tmp_path / "outer.json")  # the same files, read for the same keys


def test_a_forged_run_record_only_warns_and_widens_nothing(made: Path, tmp_path: Path) -> None:
    outside = tmp_path.parent / "secret.safetensors"
    forged = _rewrite(made, tmp_path / "forged.png", run=json.dumps({
        "device": "xla", "dtype": "fp3", "models": {str(outside): "0" * 32, "../../etc": "1" * 32}}))
    engine = Engine(output_dir=tmp_path / "forged", models=_MODELS)

    with pytest.warns(RerunWarning) as caught:
        options = rerun_options(read_png(forged), {"device": "auto", "dtype": "auto"}, engine.paths)

    assert options == {"device": "auto", "dtype": "auto"}  # neither recorded value is one to use
    messages = [str(warning.message) for warning in caught]
    assert "forged.png was made on 'xla'; running on auto: pixels may differ" in messages
    assert "forged.png was made in 'fp3'; running in auto: pixels may differ" in messages
    assert sum("cannot be checked here" in message and "outside the input directories" in message
               for message in messages) == 2  # the roots stay the user's: nothing outside them is read
