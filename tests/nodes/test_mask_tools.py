"""Masks made from images, thresholds, and cropping to a mask and pasting back."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from graphflow import Engine
from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from nodes.mask import ColorToMask, CropToMask, ImageToMask, PasteCrop, ThresholdMask
from tests.nodes.calls import run_node


def seeded(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channel, weights", [("luminance", (0.299, 0.587, 0.114)), ("red", (1, 0, 0)),
                                              ("green", (0, 1, 0)), ("blue", (0, 0, 1))])
def test_image_to_mask_takes_a_channel_or_the_luminance(ctx: RunContext, channel: str, weights: tuple) -> None:
    image = seeded(2, 5, 7, 3, seed=0)

    mask = run_node(ImageToMask, ctx, image=image, channel=channel)["mask"]

    expected = sum(image[..., index] * weight for index, weight in enumerate(weights))
    assert mask.shape == (2, 5, 7)
    torch.testing.assert_close(mask, expected)


def test_color_to_mask_selects_pixels_within_the_tolerance_of_the_colour(ctx: RunContext) -> None:
    pixels = np.array([[[200, 10, 10], [203, 12, 7], [196, 10, 10], [210, 10, 10], [10, 10, 200]]], np.uint8)
    image = torch.from_numpy(pixels[None].astype(np.float32) / 255)

    exact = run_node(ColorToMask, ctx, image=image, red=200, green=10, blue=10)["mask"]
    near = run_node(ColorToMask, ctx, image=image, red=200, green=10, blue=10, tolerance=4)["mask"]

    assert exact[0, 0].tolist() == [1, 0, 0, 0, 0]
    assert near[0, 0].tolist() == [1, 1, 1, 0, 0]


def test_threshold_mask_is_1_strictly_above_the_threshold(ctx: RunContext) -> None:
    mask = torch.tensor([[[0.0, 0.25, 0.5, 0.51, 1.0]]])

    hard = run_node(ThresholdMask, ctx, mask=mask, threshold=0.5)["mask"]

    assert hard.tolist() == [[[0, 0, 0, 1, 1]]] and hard.dtype == torch.float32


def test_crop_to_mask_crops_to_the_padded_box_of_every_mask_in_the_batch(ctx: RunContext) -> None:
    image, mask = seeded(2, 40, 50, 3, seed=1), torch.zeros(2, 40, 50)
    mask[0, 10:14, 20:25] = 0.5
    mask[1, 12:20, 22:23] = 1

    result = run_node(CropToMask, ctx, image=image, mask=mask, padding=3, multiple=1)

    assert (result["x"], result["y"], result["width"], result["height"]) == (17, 7, 11, 16)
    assert torch.equal(result["image"], image[:, 7:23, 17:28]) and torch.equal(result["mask"], mask[:, 7:23, 17:28])


def test_crop_to_mask_clips_the_padding_at_the_edges_and_keeps_everything_for_an_empty_mask(ctx: RunContext) -> None:
    image, mask = seeded(1, 30, 20, 3, seed=2), torch.zeros(1, 30, 20)
    mask[0, 1, 18] = 1

    corner = run_node(CropToMask, ctx, image=image, mask=mask, padding=5, multiple=1)
    empty = run_node(CropToMask, ctx, image=image, mask=torch.zeros(1, 30, 20), padding=5, multiple=1)

    assert (corner["x"], corner["y"], corner["width"], corner["height"]) == (13, 0, 7, 7)
    assert (empty["x"], empty["y"], empty["width"], empty["height"]) == (0, 0, 20, 30)
    assert torch.equal(empty["image"], image)


def test_crop_to_mask_grows_the_box_to_whole_latents_around_its_centre_inside_the_image(ctx: RunContext) -> None:
    image, mask = seeded(1, 40, 50, 3, seed=1), torch.zeros(1, 40, 50)
    mask[0, 10:20, 20:25] = 1
    mask[0, 36, 45] = 0  # an unselected pixel changes nothing

    middle = run_node(CropToMask, ctx, image=image, mask=mask, padding=3)
    mask[0, 39, 49] = 1
    corner = run_node(CropToMask, ctx, image=image, mask=torch.where(torch.arange(50) > 46, mask, 0), padding=1)

    assert (middle["x"], middle["y"], middle["width"], middle["height"]) == (15, 7, 16, 16)
    assert (corner["x"], corner["y"], corner["width"], corner["height"]) == (42, 32, 8, 8)
    assert corner["image"].shape == (1, 8, 8, 3)


def test_crop_to_mask_refuses_a_mask_of_another_size(ctx: RunContext) -> None:
    with pytest.raises(NodeInputError, match="image is 20x30, mask is 30x20"):
        run_node(CropToMask, ctx, image=torch.zeros(1, 30, 20, 3), mask=torch.zeros(1, 20, 30))


def test_paste_crop_puts_a_crop_back_where_it_came_from(ctx: RunContext) -> None:
    image, mask = seeded(1, 32, 48, 3, seed=3), torch.zeros(1, 32, 48)
    mask[0, 8:16, 10:30] = 1
    cut = run_node(CropToMask, ctx, image=image, mask=mask, padding=2, multiple=1)
    place = {name: cut[name] for name in ("x", "y", "width", "height")}

    unchanged = run_node(PasteCrop, ctx, image=image, crop=cut["image"], **place)["image"]
    edited = run_node(PasteCrop, ctx, image=image, crop=1 - cut["image"], **place)["image"]

    assert torch.equal(unchanged, image)
    inside = (slice(None), slice(6, 18), slice(8, 32))
    assert torch.equal(edited[inside], 1 - image[inside])
    outside = edited.clone()
    outside[inside] = image[inside]
    assert torch.equal(outside, image)


def test_paste_crop_resizes_a_crop_rendered_larger_and_blends_through_a_feathered_mask(ctx: RunContext) -> None:
    image, crop = torch.zeros(1, 40, 40, 3), torch.ones(1, 32, 32, 3)
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1

    pasted = run_node(PasteCrop, ctx, image=image, crop=crop, x=4, y=8, width=16, height=16, mask=mask,
                      feather=2)["image"][0, ..., 0]

    small = cv2.resize(mask[0].numpy(), (16, 16), interpolation=cv2.INTER_LINEAR)
    expected = np.zeros((40, 40), np.float32)
    expected[8:24, 4:20] = cv2.GaussianBlur(small, (5, 5), 2 / 3)
    np.testing.assert_allclose(pasted.numpy(), expected, atol=1e-6)


def test_paste_crop_refuses_an_area_outside_the_image_and_a_mask_of_a_third_size(ctx: RunContext) -> None:
    image, crop = torch.zeros(1, 20, 20, 3), torch.zeros(1, 8, 8, 3)
    with pytest.raises(NodeInputError, match="does not fit in the 20x20 image"):
        run_node(PasteCrop, ctx, image=image, crop=crop, x=15, y=0, width=8, height=8)
    with pytest.raises(NodeInputError, match="the mask is 5x5"):
        run_node(PasteCrop, ctx, image=image, crop=crop, x=0, y=0, width=8, height=8, mask=torch.zeros(1, 5, 5))


def test_crop_and_paste_wire_up_in_a_graph(tmp_path: Path) -> None:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    region = np.zeros((24, 32), np.uint8)
    region[5:9, 6:12] = 255
    Image.fromarray(region).save(tmp_path / "region.png")
    cut = {name: {"from": f"crop.{name}"} for name in ("x", "y", "width", "height")}
    document = {"graphflow": 1, "nodes": {
        "photo": {"type": "LoadImage", "inputs": {"path": "photo.png"}},
        "region": {"type": "LoadMask", "inputs": {"path": "region.png"}},
        "crop": {"type": "CropToMask", "inputs": {"image": {"from": "photo.image"}, "mask": {"from": "region.mask"},
                                                  "padding": 1}},
        "paste": {"type": "PasteCrop", "inputs": {"image": {"from": "photo.image"}, "crop": {"from": "crop.image"},
                                                  **cut}},
    }, "outputs": {"pasted": "paste.image", "width": "crop.width"}}

    outputs = Engine(input_dirs=[tmp_path]).run(document).outputs

    assert outputs["width"] == 8
    assert torch.equal(outputs["pasted"], torch.from_numpy(pixels[None].astype(np.float32) / 255))
