import cv2
import numpy as np
import pytest
import torch

from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from nodes.mask import FeatherMask, GrowMask, InvertMask, MaskBlend


def seeded(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def square_mask(size: int, start: int, stop: int) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[:, start:stop, start:stop] = 1
    return mask


def test_mask_blend_mixes_pixels_by_the_mask(ctx: RunContext) -> None:
    background, foreground, mask = seeded(1, 5, 7, 3, seed=0), seeded(1, 5, 7, 3, seed=1), seeded(1, 5, 7, seed=2)
    mask[0, 0, :2] = torch.tensor([0.0, 1.0])
    inputs = {"background": background, "foreground": foreground, "mask": mask}
    before = {name: value.clone() for name, value in inputs.items()}

    image = MaskBlend().run(ctx, **inputs, feather=0)["image"]

    m = mask[0].numpy()[..., None]
    np.testing.assert_allclose(image[0].numpy(), background[0].numpy() * (1 - m) + foreground[0].numpy() * m,
                               atol=1e-6)
    assert torch.equal(image[0, 0, 0], background[0, 0, 0]) and torch.equal(image[0, 0, 1], foreground[0, 0, 1])
    assert all(torch.equal(inputs[name], before[name]) for name in inputs)


def test_mask_blend_feathers_the_mask_like_feather_mask(ctx: RunContext) -> None:
    background, foreground = torch.zeros(1, 32, 32, 3), torch.ones(1, 32, 32, 3)
    mask = square_mask(32, 8, 24)

    image = MaskBlend().run(ctx, background=background, foreground=foreground, mask=mask, feather=4)["image"]

    blurred = cv2.GaussianBlur(mask[0].numpy(), (9, 9), 4 / 3)
    np.testing.assert_allclose(image[0].numpy(), np.repeat(blurred[..., None], 3, axis=-1), atol=1e-6)
    assert 0 < image[0, 8, 16, 0] < 1  # the hard edge became a ramp


def test_mask_blend_broadcasts_a_batch_of_one(ctx: RunContext) -> None:
    background, foreground, mask = seeded(3, 4, 4, 3, seed=0), seeded(1, 4, 4, 3, seed=1), seeded(1, 4, 4, seed=2)

    image = MaskBlend().run(ctx, background=background, foreground=foreground, mask=mask, feather=0)["image"]

    assert image.shape == (3, 4, 4, 3)
    for index in range(3):
        expected = background[index] * (1 - mask[0, ..., None]) + foreground[0] * mask[0, ..., None]
        assert torch.allclose(image[index], expected)


def test_mask_blend_names_both_sizes_when_they_differ(ctx: RunContext) -> None:
    with pytest.raises(NodeInputError, match="background is 64x32, foreground is 32x32, mask is 64x32"):
        MaskBlend().run(ctx, background=torch.zeros(1, 32, 64, 3), foreground=torch.zeros(1, 32, 32, 3),
                        mask=torch.zeros(1, 32, 64), feather=0)


def test_mask_blend_refuses_unequal_batches(ctx: RunContext) -> None:
    with pytest.raises(NodeInputError, match="background has 2, foreground has 3, mask has 1"):
        MaskBlend().run(ctx, background=torch.zeros(2, 4, 4, 3), foreground=torch.zeros(3, 4, 4, 3),
                        mask=torch.zeros(1, 4, 4), feather=0)


@pytest.mark.parametrize("radius", [1, 3, 10])
def test_feather_mask_is_a_gaussian_of_kernel_2r_plus_1_and_sigma_r_over_3(ctx: RunContext, radius: int) -> None:
    mask = torch.cat([square_mask(24, 6, 18), square_mask(24, 0, 12)])

    feathered = FeatherMask().run(ctx, mask=mask, radius=radius)["mask"]

    size = 2 * radius + 1
    for index in range(2):
        expected = cv2.GaussianBlur(mask[index].numpy(), (size, size), radius / 3)
        np.testing.assert_array_equal(feathered[index].numpy(), expected)


def test_feather_mask_of_radius_0_keeps_the_mask(ctx: RunContext) -> None:
    mask = square_mask(8, 2, 6)
    assert torch.equal(FeatherMask().run(ctx, mask=mask, radius=0)["mask"], mask)


@pytest.mark.parametrize("pixels", [1, 2, 5])
def test_grow_mask_dilates_a_pixel_into_a_disc_of_diameter_2n_plus_1(ctx: RunContext, pixels: int) -> None:
    mask = torch.zeros(1, 15, 15)
    mask[0, 7, 7] = 1

    grown = GrowMask().run(ctx, mask=mask, pixels=pixels)["mask"][0].numpy()

    size = 2 * pixels + 1
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)).astype(np.float32)
    expected = np.zeros((15, 15), np.float32)
    expected[7 - pixels : 8 + pixels, 7 - pixels : 8 + pixels] = disc
    np.testing.assert_array_equal(grown, expected)
    rows, columns = np.nonzero(grown)
    assert np.ptp(rows) + 1 == size and np.ptp(columns) + 1 == size


def test_grow_mask_with_negative_pixels_erodes(ctx: RunContext) -> None:
    mask = square_mask(16, 3, 13)

    shrunk = GrowMask().run(ctx, mask=mask, pixels=-2)["mask"]

    assert torch.equal(shrunk, square_mask(16, 5, 11))  # the disc reaches 2 px along each axis


def test_grow_mask_of_0_keeps_the_mask(ctx: RunContext) -> None:
    mask = seeded(1, 6, 6, seed=3)
    assert torch.equal(GrowMask().run(ctx, mask=mask, pixels=0)["mask"], mask)


def test_invert_mask_swaps_selected_and_kept(ctx: RunContext) -> None:
    mask = seeded(2, 5, 3, seed=4)
    before = mask.clone()

    inverted = InvertMask().run(ctx, mask=mask)["mask"]

    assert torch.equal(inverted, 1 - before) and torch.equal(mask, before)
