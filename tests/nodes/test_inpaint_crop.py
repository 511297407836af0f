"""InpaintCrop and InpaintPaste make the region, crops and overlay of diffusers' `padding_mask_crop` exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from nodes.imaging import from_uint8, to_uint8
from nodes.inpaint_crop import InpaintCrop, InpaintPaste
from tests.nodes.calls import run_node

processors = pytest.importorskip("diffusers.image_processor")

REGION = ("left", "top", "right", "bottom")


def _photo(rows: int, columns: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (rows, columns, 3), dtype=np.uint8)


def _mask(rows: int, columns: int, box: tuple[int, int, int, int], value: int = 255) -> np.ndarray:
    left, top, right, bottom = box
    mask = np.zeros((rows, columns), np.uint8)
    mask[top:bottom, left:right] = value
    return mask


def _tensor(array: np.ndarray) -> torch.Tensor:
    return from_uint8(array[None])


# (photo rows x columns, mask box, mask value, padding, output width x height)
CASES = {
    "wide box in a square output: grows in height": ((60, 80), (20, 25, 60, 31), 255, 3, (64, 64)),
    "tall box in a wide output: grows in width": ((60, 80), (38, 5, 42, 55), 255, 2, (96, 48)),
    "box on the right border: shifted back inside": ((60, 80), (70, 20, 80, 30), 255, 5, (64, 64)),
    "box on the top-left corner": ((60, 80), (0, 0, 6, 9), 255, 4, (48, 64)),
    "too tall for the photo: cut, the bands filled": ((40, 90), (30, 10, 50, 30), 255, 2, (32, 96)),
    "too wide for the photo: cut, the bands filled": ((90, 40), (10, 30, 30, 50), 255, 2, (96, 32)),
    "soft mask values": ((50, 70), (10, 12, 40, 20), 140, 0, (56, 40)),
}


@pytest.mark.parametrize(("shape", "box", "value", "padding", "size"), CASES.values(), ids=CASES.keys())
def test_inpaint_crop_crops_as_the_pipeline_processors_do(ctx: RunContext, shape: tuple[int, int],
                                                          box: tuple[int, int, int, int], value: int, padding: int,
                                                          size: tuple[int, int]) -> None:
    photo, mask = _photo(*shape), _mask(*shape, box, value)
    (width, height), mask_picture = size, Image.fromarray(mask)
    region = processors.VaeImageProcessor.get_crop_region(mask_picture, width, height, pad=padding)
    # the pipeline's control-image and mask processors (the init image's only normalises to -1..1 on top)
    images = processors.VaeImageProcessor(do_convert_rgb=True, do_normalize=False)
    masks = processors.VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    options = {"height": height, "width": width, "crops_coords": region, "resize_mode": "fill"}

    result = run_node(InpaintCrop, ctx, image=_tensor(photo), mask=_tensor(mask), padding=padding, width=width,
                      height=height)

    assert tuple(result[name] for name in REGION) == region
    assert torch.equal(result["image"], images.preprocess(Image.fromarray(photo), **options).permute(0, 2, 3, 1))
    assert torch.equal((result["mask"] >= 0.5).float(), masks.preprocess(mask_picture, **options)[:, 0])


def test_inpaint_crop_takes_the_photo_size_in_whole_latents_and_the_whole_photo_for_an_empty_mask(
        ctx: RunContext) -> None:
    photo = _photo(37, 50)

    result = run_node(InpaintCrop, ctx, image=_tensor(photo), mask=torch.zeros(1, 37, 50), padding=4)

    assert result["image"].shape == (1, 32, 48, 3) and result["mask"].shape == (1, 32, 48)
    assert tuple(result[name] for name in REGION) == (0, 0, 50, 37)
    assert not result["mask"].any()


def test_inpaint_crop_boxes_every_mask_of_the_batch(ctx: RunContext) -> None:
    masks = torch.from_numpy(np.stack([_mask(40, 40, (2, 3, 6, 8)), _mask(40, 40, (30, 20, 33, 35))])).float() / 255

    result = run_node(InpaintCrop, ctx, image=_tensor(_photo(40, 40)), mask=masks, padding=0, width=16, height=16)

    assert tuple(result[name] for name in REGION) == (2, 3, 34, 35)
    assert result["image"].shape == (1, 16, 16, 3) and result["mask"].shape == (2, 16, 16)


def test_inpaint_crop_refuses_a_mask_of_another_size(ctx: RunContext) -> None:
    with pytest.raises(NodeInputError, match="sizes differ"):
        run_node(InpaintCrop, ctx, image=_tensor(_photo(20, 30)), mask=torch.ones(1, 30, 20))


@pytest.mark.parametrize("mask_value", [255, 90])
def test_inpaint_paste_is_the_pipeline_overlay(ctx: RunContext, mask_value: int) -> None:
    photo, render = _photo(60, 80, seed=1), _photo(40, 56, seed=2)
    mask = _mask(60, 80, (20, 25, 50, 33), mask_value)
    mask[27, 22:30] = 0  # a hole in the mask keeps the photo
    region = (11, 9, 61, 45)

    result = run_node(InpaintPaste, ctx, image=_tensor(photo), mask=_tensor(mask), render=_tensor(render),
                      **dict(zip(REGION, region, strict=True)))

    theirs = processors.VaeImageProcessor().apply_overlay(Image.fromarray(mask), Image.fromarray(photo),
                                                           Image.fromarray(render), region)
    assert np.array_equal(to_uint8(result["image"])[0], np.asarray(theirs))
    assert np.array_equal(to_uint8(result["image"])[0][mask == 0], photo[mask == 0])


def test_inpaint_paste_refuses_a_region_outside_the_image(ctx: RunContext) -> None:
    with pytest.raises(NodeInputError, match="not inside the 30x20 image"):
        run_node(InpaintPaste, ctx, image=torch.zeros(1, 20, 30, 3), mask=torch.zeros(1, 20, 30),
                 render=torch.zeros(1, 16, 16, 3), left=4, top=0, right=31, bottom=20)
