import cv2
import numpy as np
import pytest
import torch

from graphflow.context import RunContext
from nodes.preprocess import Canny


def photo_like(batch: int, height: int, width: int) -> torch.Tensor:
    """Flat blocks with soft noise, so that Canny finds strong edges and weak ones for hysteresis to judge."""
    rng = np.random.default_rng(height * width)
    blocks = rng.random((batch, (height + 7) // 8, (width + 7) // 8, 3), dtype=np.float32)
    pictures = np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2)[:, :height, :width]
    noisy = pictures + rng.normal(0, 0.05, pictures.shape).astype(np.float32)
    return torch.from_numpy(np.stack([cv2.GaussianBlur(item, (3, 3), 0.8) for item in noisy]).clip(0, 1))


def cv2_canny(image: np.ndarray, low: int, high: int) -> np.ndarray:
    rgb = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    return cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), low, high)


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40), (65, 17), (128, 96)])
@pytest.mark.parametrize("low, high", [(100, 200), (10, 60)])
def test_canny_matches_cv2_pixel_for_pixel(ctx: RunContext, height: int, width: int, low: int, high: int) -> None:
    image = photo_like(2, height, width)
    before = image.clone()

    edges = Canny().run(ctx, image=image, low=low, high=high)["image"]

    assert edges.dtype == torch.float32 and edges.shape == (2, height, width, 3)
    for index in range(2):
        expected = cv2_canny(image[index].numpy(), low, high) / np.float32(255)
        assert expected.any()
        for channel in range(3):
            np.testing.assert_array_equal(edges[index, ..., channel].numpy(), expected)
    assert torch.equal(image, before)


def test_canny_finds_the_outline_of_a_square(ctx: RunContext) -> None:
    image = torch.zeros(1, 16, 16, 3)
    image[:, 4:12, 4:12] = 1

    edges = Canny().run(ctx, image=image, low=100, high=200)["image"][0, ..., 0]

    assert set(edges.unique().tolist()) == {0.0, 1.0}
    assert edges[:, :3].sum() == 0 and edges[8, 8] == 0  # nothing far from the outline
    assert edges[8, 3:5].sum() + edges[8, 11:13].sum() >= 2  # left and right sides are found
