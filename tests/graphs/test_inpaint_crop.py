"""graphs/inpaint_crop.json gives the pixels of StableDiffusionControlNetInpaintPipeline(..., padding_mask_crop=N).

Each case runs the example graph through the Engine on the tiny models and the pipeline over the same model
folders, with the same seed, prompts, control image and mask, for a 4-channel and a 9-channel UNet, and prints a
row of the parity table: `pytest tests/graphs/test_inpaint_crop.py -s | grep parity`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from graphflow import Engine
from graphflow.models import ModelManager
from nodes.imaging import to_uint8
from nodes.mask import feather_mask
from tests.nodes.sampling_graphs import CANNY, Pipelines

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
STEPS, SEED = 3, 5
PROMPT, NEGATIVE = "a large green plant in a ceramic pot", "blurry, low quality, distorted"


def _assets(folder: Path) -> Path:
    """Photos and masks beside the example's room: `wide` is 120x80 with a thin bar across it (`bar`) or down it
    (`post`), `odd` 100x84 (not whole latents) with a mask in its bottom-right corner, touching two borders."""
    y, x = np.mgrid[0:84, 0:120]
    photo = np.stack([x * 2, y * 3, 255 - x - y], axis=-1).clip(0, 255).astype(np.uint8)
    photo[20:60:5, 10:110] = 255  # edges for the Canny ControlNet
    bar, post, corner = np.zeros((80, 120), np.uint8), np.zeros((80, 120), np.uint8), np.zeros((84, 100), np.uint8)
    bar[36:42, 30:90], post[10:70, 58:62], corner[60:, 70:] = 255, 255, 255
    for name, pixels in {"wide": photo[:80], "bar": bar, "post": post, "odd": photo[:, :100], "corner": corner}.items():
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _assets(tmp_path_factory.mktemp("inpaint-crop"))


@pytest.fixture(autouse=True)
def tiny_sources(tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHFLOW_TINY_MODELS", str(tiny_models))


@pytest.fixture(scope="module")
def engine(tiny_models: Path, assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine(input_dirs=[ROOT, assets], output_dir=tmp_path_factory.mktemp("out"), models=ModelManager())


@pytest.fixture(scope="module")
def pipelines(tiny_models: Path, assets: Path) -> Pipelines:
    return Pipelines(tiny_models, assets)


def _inputs(engine: Engine, photo: str, mask: str) -> dict[str, torch.Tensor]:
    """The photo, its Canny edges (as the graph makes them) and the mask, as the engine loads them."""
    document = {"graphflow": 1, "nodes": {
        "photo": {"type": "LoadImage", "inputs": {"path": photo}},
        "edges": {"type": "Canny", "inputs": {"image": {"from": "photo.image"}, "low": 100, "high": 200}},
        "mask": {"type": "LoadMask", "inputs": {"path": mask}}},
        "outputs": {"photo": "photo.image", "edges": "edges.image", "mask": "mask.mask"}}
    return engine.run(document).outputs


def _located(name: str, assets: Path) -> str:
    """A path under the repository as it is, a bare name in the test's own asset folder."""
    return name if "/" in name else str(assets / name)


def _picture(batch: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(batch)[0])


# (case, photo, mask, graph params): width / height 0 are the pipeline's defaults (the photo's, whole latents)
CASES = [
    ("room 128x96, padding 32: the whole photo", "graphs/assets/room.png", "graphs/assets/room_mask.png",
     {"padding": 32}),
    ("room, padding 16, on the left and bottom borders", "graphs/assets/room.png", "graphs/assets/room_mask.png",
     {"padding": 16}),
    ("room, padding 8, rendered 64x128: box cut at the photo, filled", "graphs/assets/room.png",
     "graphs/assets/room_mask.png", {"padding": 8, "width": 64, "height": 128}),
    ("wide 120x80, bar across: box grows in height", "wide.png", "bar.png", {"padding": 4}),
    ("wide 120x80, post down: box grows in width", "wide.png", "post.png", {"padding": 4}),
    ("wide bar rendered 64x128: box cut at the photo, filled", "wide.png", "bar.png",
     {"padding": 4, "width": 64, "height": 128}),
    ("odd 100x84 (rendered 96x80), mask in a corner", "odd.png", "corner.png", {"padding": 16}),
    ("room, padding 16, feather 4", "graphs/assets/room.png", "graphs/assets/room_mask.png",
     {"padding": 16, "feather": 4}),
]


@pytest.mark.parametrize("checkpoint", ["sd15", "sd15-inpaint"])
@pytest.mark.parametrize(("case", "photo", "mask", "params"), CASES, ids=[case[0] for case in CASES])
def test_inpaint_crop_graph_matches_the_pipeline_with_padding_mask_crop(
        case: str, photo: str, mask: str, params: dict[str, int], checkpoint: str, engine: Engine, assets: Path,
        pipelines: Pipelines) -> None:
    source = {"photo": _located(photo, assets), "mask": _located(mask, assets)}
    result = engine.run(ROOT / "graphs/inpaint_crop.json", {
        "checkpoint": f"tiny:{checkpoint}", "controlnet": f"tiny:{CANNY.model}", **source,
        "prompt": PROMPT, "negative": NEGATIVE, "seed": SEED, "steps": STEPS, **params})
    # the pipeline gets what a user would give it: the photo, the (feathered) mask and the photo's Canny edges
    given = _inputs(engine, source["photo"], source["mask"])
    original, selected = given["photo"], feather_mask(given["mask"], params.get("feather", 0))
    size = {name: params[name] for name in ("width", "height") if params.get(name)}
    pipeline = pipelines.pipeline("StableDiffusionControlNetInpaintPipeline", checkpoint)
    theirs = pipeline(prompt=PROMPT, negative_prompt=NEGATIVE, image=_picture(original),
                      mask_image=_picture(selected), control_image=_picture(given["edges"]),
                      padding_mask_crop=params["padding"], num_inference_steps=STEPS,
                      generator=torch.Generator("cpu").manual_seed(SEED), **size).images[0]

    ours, theirs = to_uint8(result.outputs["image"])[0], np.asarray(theirs)
    difference = np.abs(ours.astype(int) - theirs.astype(int)).max(axis=-1)
    inside = to_uint8(selected)[0] > 0
    channels = 9 if checkpoint == "sd15-inpaint" else 4
    print(f"\nparity | padding_mask_crop, {channels}-ch UNet, {case} | max abs diff inside the mask "
          f"{difference[inside].max()}, outside {difference[~inside].max()}")
    assert ours.shape == theirs.shape and difference.max() == 0
    kept = to_uint8(original)[0]
    assert np.array_equal(ours[~inside], kept[~inside])
    assert not np.array_equal(ours[inside], kept[inside])  # repainted, not the photo passed through
