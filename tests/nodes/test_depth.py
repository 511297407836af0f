"""Depth on a tiny random DPT written in transformers' format: the real loading and processing code, offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from graphflow import Engine
from graphflow.context import RunContext
from graphflow.errors import ValidationError
from graphflow.models import ModelManager
from graphflow.models.sources import ModelNotFoundError
from graphflow.models.tiny_depth import write_tiny_dpt
from nodes.imaging import from_uint8
from nodes.preprocess import Depth
from tests.nodes.calls import run_node
from tests.nodes.guide_preprocessors import DepthPreprocessor
from tests.nodes.test_preprocess import as_uint8, photo_like


@pytest.fixture(scope="module")
def dpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dpt(tmp_path_factory.mktemp("models") / "dpt")


@pytest.fixture
def model_ctx(ctx: RunContext, dpt: Path) -> RunContext:
    """A context whose input directories include the tiny model's, and a manager of its own."""
    from graphflow.paths import PathPolicy

    ctx.paths = PathPolicy.create([*ctx.paths.input_roots, dpt.parent], ctx.paths.output_root)
    ctx.models = ModelManager()
    return ctx


def depth_graph(model: str) -> dict:
    return {"graphflow": 1, "nodes": {
        "photo": {"type": "LoadImage", "inputs": {"path": "photo.png"}},
        "depth": {"type": "Depth", "inputs": {"image": {"from": "photo.image"}, "model": model}},
    }, "outputs": {"depth": "depth.image"}}


def test_tiny_dpt_is_written_the_same_every_time(tmp_path: Path) -> None:
    first, second = write_tiny_dpt(tmp_path / "a"), write_tiny_dpt(tmp_path / "b")
    names = sorted(file.name for file in first.iterdir())
    assert names == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert all((first / name).read_bytes() == (second / name).read_bytes() for name in names)
    assert (first / "model.safetensors").stat().st_size < 1 << 20


@pytest.mark.parametrize("height, width", [(40, 56), (33, 20)])
def test_depth_equals_the_transformers_depth_estimation_pipeline_image_by_image(
        model_ctx: RunContext, dpt: Path, height: int, width: int) -> None:
    from PIL import Image
    from transformers import pipeline

    image = photo_like(2, height, width)

    depth = run_node(Depth, model_ctx, image=image, model=str(dpt))["image"]

    assert depth.shape == (2, height, width, 3) and depth.dtype == torch.float32
    estimator = pipeline("depth-estimation", model=str(dpt))
    for index in range(2):
        picture = Image.fromarray(np.round(image[index].numpy() * 255).astype(np.uint8))
        reference = estimator(picture)
        predicted = reference["predicted_depth"].numpy()
        normalised = (predicted - predicted.min()) / (predicted.max() - predicted.min())
        np.testing.assert_array_equal(depth[index, ..., 0].numpy(), normalised)
        assert torch.equal(depth[index, ..., 0], depth[index, ..., 2])
        # the pipeline's own 8-bit picture truncates the same values
        truncated = (depth[index, ..., 0].numpy() * 255).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(reference["depth"]), truncated)
    assert depth.min() == 0 and depth.max() == 1


@pytest.mark.parametrize("height, width", [(64, 96), (96, 64), (80, 80)])
def test_depth_at_model_resolution_is_the_guides_depth_preprocessor_pixel_for_pixel(
        model_ctx: RunContext, dpt: Path, height: int, width: int) -> None:
    from PIL import Image

    pixels = as_uint8(photo_like(2, height, width).numpy())
    guide = DepthPreprocessor(dpt)

    depth = run_node(Depth, model_ctx, image=from_uint8(pixels), model=str(dpt), resolution="model")["image"]

    assert depth.shape == (2, 32, 32, 3)  # the tiny processor's size, whatever the input's
    for index in range(2):
        expected = np.asarray(guide(Image.fromarray(pixels[index])))
        np.testing.assert_array_equal(depth[index].numpy(), expected / np.float32(255))
    assert depth.min() == 0 and depth.max() == 1


def test_depth_loads_the_model_once_across_runs_and_graphs(tmp_path: Path, dpt: Path) -> None:
    from PIL import Image

    for name, seed in (("photo.png", 1), ("other.png", 2)):
        pixels = np.random.default_rng(seed).integers(0, 255, (32, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / name)
    manager = ModelManager()
    other = depth_graph(str(dpt))
    other["nodes"]["photo"]["inputs"]["path"] = "other.png"
    for graph in (depth_graph(str(dpt)), other):
        Engine(input_dirs=[tmp_path, dpt.parent], models=manager).run(graph)
    assert [key.kind for key in manager.loads] == ["depth"] and sum(manager.loads.values()) == 1


def test_a_depth_model_missing_from_the_cache_names_the_repository_the_cache_and_a_local_copy(
        model_ctx: RunContext) -> None:
    from huggingface_hub import constants

    with pytest.raises(ModelNotFoundError, match="nobody/no-such-depth-model") as raised:
        run_node(Depth, model_ctx, image=photo_like(1, 16, 16), model="nobody/no-such-depth-model")
    message = str(raised.value)
    assert constants.HF_HUB_CACHE in message and "HF_HUB_OFFLINE" in message
    assert "--input-dir" in message and "hf download nobody/no-such-depth-model" in message


def test_a_model_folder_outside_the_input_directories_is_refused(tmp_path: Path, dpt: Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "photo.png")
    with pytest.raises(ValidationError) as raised:  # refused at planning, before any node runs
        Engine(input_dirs=[tmp_path], models=ModelManager()).run(depth_graph(str(dpt)))
    assert [(error.code, error.input) for error in raised.value.errors] == [("path_outside_root", "model")]


def test_a_local_folder_missing_a_file_says_which(model_ctx: RunContext, dpt: Path) -> None:
    incomplete = Path(model_ctx.paths.input_roots[0]) / "dpt-copy"
    incomplete.mkdir()
    (incomplete / "config.json").write_bytes((dpt / "config.json").read_bytes())

    with pytest.raises(ModelNotFoundError, match=r"lacks preprocessor_config\.json, model\.safetensors"):
        run_node(Depth, model_ctx, image=photo_like(1, 16, 16), model="dpt-copy")
