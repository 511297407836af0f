"""Fuzzing InpaintCrop and InpaintPaste (hypothesis, small sizes): any mask, size, padding or output size either works
(a region inside the image around the mask, crops of the output size, a paste that keeps the image outside the
mask exactly) or is refused with a NodeInputError saying what to change; never another exception."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from graphflow.context import CancelToken, RunContext
from graphflow.errors import NodeInputError
from graphflow.paths import PathPolicy
from nodes.imaging import from_uint8, to_uint8
from nodes.inpaint_crop import InpaintCrop, InpaintPaste
from tests.nodes.calls import run_node

REGION = ("left", "top", "right", "bottom")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CTX = RunContext(node="n", type="Test", paths=PathPolicy.create(), cancel=CancelToken())


@st.composite
def masks(draw: st.DrawFn, rows: int, columns: int, batch: int = 1) -> np.ndarray:
    """8-bit masks [B, H, W]: empty, full, one pixel (often a corner), a box, or noise."""
    kind = draw(st.sampled_from(["zeros", "ones", "pixel", "corner", "box", "noise"]))
    mask = np.zeros((batch, rows, columns), np.uint8)
    if kind == "ones":
        mask[:] = 255
    elif kind in ("pixel", "corner"):
        row = draw(st.sampled_from([0, rows - 1])) if kind == "corner" else draw(st.integers(0, rows - 1))
        column = draw(st.sampled_from([0, columns - 1])) if kind == "corner" else draw(st.integers(0, columns - 1))
        mask[draw(st.integers(0, batch - 1)), row, column] = draw(st.integers(1, 255))
    elif kind == "box":
        top, left = draw(st.integers(0, rows - 1)), draw(st.integers(0, columns - 1))
        mask[:, top:draw(st.integers(top + 1, rows)), left:draw(st.integers(left + 1, columns))] = 255
    elif kind == "noise":
        mask[:] = draw(st.integers(0, 2**32 - 1).map(
            lambda seed: np.random.default_rng(seed).choice([0, 0, 0, 128, 255], mask.shape).astype(np.uint8)))
    return mask


def photo(rows: int, columns: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return from_uint8(np.random.default_rng(seed).integers(0, 256, (batch, rows, columns, 3), dtype=np.uint8))


sides = st.integers(1, 48)
output_sides = st.one_of(st.just(0), st.integers(1, 9).map(lambda n: 8 * n))


def crop(image: torch.Tensor, mask: np.ndarray, padding: int, width: int, height: int) -> dict:
    return run_node(InpaintCrop, CTX, image=image, mask=from_uint8(mask), padding=padding, width=width,
                    height=height)


@FUZZ
@given(data=st.data(), rows=sides, columns=sides, padding=st.one_of(st.integers(0, 8), st.just(16384)),
       width=output_sides, height=output_sides, batch=st.integers(1, 2))
def test_inpaint_crop_gives_a_region_around_the_mask_at_the_output_size_or_a_node_input_error(
        data: st.DataObject, rows: int, columns: int, padding: int, width: int, height: int, batch: int) -> None:
    mask = data.draw(masks(rows, columns, batch))
    image = photo(rows, columns)
    try:
        result = crop(image, mask, padding, width, height)
    except NodeInputError as error:
        assert (not width and columns < 8) or (not height and rows < 8), error
        assert "set width and height" in str(error)
        return
    width, height = width or columns // 8 * 8, height or rows // 8 * 8
    left, top, right, bottom = (result[name] for name in REGION)
    assert 0 <= left < right <= columns and 0 <= top < bottom <= rows
    hit_rows, hit_columns = np.flatnonzero(mask.any(axis=(0, 2))), np.flatnonzero(mask.any(axis=(0, 1)))
    if hit_rows.size:  # the region holds every masked pixel
        assert left <= hit_columns[0] and hit_columns[-1] < right and top <= hit_rows[0] and hit_rows[-1] < bottom
    else:
        assert (left, top, right, bottom) == (0, 0, columns, rows)
    assert result["image"].shape == (1, height, width, 3) and result["mask"].shape == (batch, height, width)
    assert result["image"].dtype == torch.float32 and 0 <= float(result["image"].min()) <= 1


@FUZZ
@given(data=st.data(), rows=st.integers(8, 40), columns=st.integers(8, 40), padding=st.integers(0, 64),
       width=output_sides, height=output_sides)
def test_crop_then_paste_keeps_the_image_outside_a_binary_mask_exactly(data: st.DataObject, rows: int, columns: int,
                                                                       padding: int, width: int, height: int) -> None:
    mask = data.draw(masks(rows, columns)) // 255 * 255  # binary: in between, the pipeline blends
    image = photo(rows, columns)
    result = crop(image, mask, padding, width, height)
    render = photo(*result["image"].shape[1:3], seed=1)
    pasted = run_node(InpaintPaste, CTX, image=image, mask=from_uint8(mask), render=render,
                      **{name: result[name] for name in REGION})["image"]
    assert pasted.shape == image.shape
    kept = mask[0] == 0
    assert np.array_equal(to_uint8(pasted)[0][kept], to_uint8(image)[0][kept])


@FUZZ
@given(rows=st.integers(1, 40), columns=st.integers(1, 40), render_rows=st.integers(1, 64),
       render_columns=st.integers(1, 64), region=st.tuples(*[st.integers(0, 48)] * 4))
def test_inpaint_paste_takes_a_render_of_any_size_and_refuses_a_region_outside_the_image(
        rows: int, columns: int, render_rows: int, render_columns: int, region: tuple[int, int, int, int]) -> None:
    left, top, right, bottom = region
    assume(right >= 1 and bottom >= 1)  # the inputs' declared minimums, checked before run
    image, mask = photo(rows, columns), np.full((1, rows, columns), 255, np.uint8)
    inputs = dict(image=image, mask=from_uint8(mask), render=photo(render_rows, render_columns, seed=2),
                  **dict(zip(REGION, region, strict=True)))
    if not (left < right <= columns and top < bottom <= rows):
        with pytest.raises(NodeInputError, match="is not inside the"):
            run_node(InpaintPaste, CTX, **inputs)
        return
    pasted = run_node(InpaintPaste, CTX, **inputs)["image"]
    assert pasted.shape == image.shape
    outside = np.ones((rows, columns), bool)
    outside[top:bottom, left:right] = False
    assert not to_uint8(pasted)[0][outside].any()  # a full mask shows the render, black outside the region


@pytest.mark.parametrize(("image", "mask", "render"), [((2, 16, 16), (3, 16, 16), (1, 16, 16)),
                                                       ((1, 16, 16), (2, 16, 16), (3, 8, 8)),
                                                       ((2, 16, 16), (1, 16, 16), (3, 8, 8))])
def test_inpaint_paste_refuses_batches_that_do_not_pair(image: tuple[int, ...], mask: tuple[int, ...],
                                                        render: tuple[int, ...]) -> None:
    with pytest.raises(NodeInputError, match="batch sizes differ"):
        run_node(InpaintPaste, CTX, image=torch.zeros(*image, 3), mask=torch.zeros(mask),
                 render=torch.zeros(*render, 3), left=0, top=0, right=16, bottom=16)


@pytest.mark.parametrize(("image", "mask"), [((2, 16, 16), (3, 16, 16)), ((1, 16, 16), (1, 16, 17)),
                                             ((1, 16, 16), (1, 17, 16))])
def test_inpaint_crop_refuses_a_mask_batch_or_size_that_does_not_fit(image: tuple[int, ...],
                                                                    mask: tuple[int, ...]) -> None:
    with pytest.raises(NodeInputError, match="differ"):
        run_node(InpaintCrop, CTX, image=torch.zeros(*image, 3), mask=torch.zeros(mask))


def test_a_one_pixel_high_strip_crops_to_a_tall_output() -> None:
    result = crop(photo(1, 64), np.zeros((1, 1, 64), np.uint8), 0, 8, 64)
    assert result["image"].shape == (1, 64, 8, 3) and (result["left"], result["right"]) == (0, 64)


@pytest.mark.parametrize("size", [{"width": 12}, {"height": 20}, {"width": 7, "height": 8}])
def test_an_output_size_off_whole_latents_is_refused_by_inpaint_crop(size: dict[str, int]) -> None:
    with pytest.raises(NodeInputError, match="multiples of 8"):
        run_node(InpaintCrop, CTX, image=photo(32, 32), mask=torch.zeros(1, 32, 32), **size)
