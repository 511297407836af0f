import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from graphflow.context import RunContext
from nodes.imaging import fit_box, from_uint8
from nodes.preprocess import Canny
from tests.nodes.calls import run_node
from tests.nodes.guide_preprocessors import AdaptiveCannyPreprocessor


def photo_like(batch: int, height: int, width: int) -> torch.Tensor:
    """Flat blocks with soft noise, so that Canny finds strong edges and weak ones for hysteresis to judge."""
    rng = np.random.default_rng(height * width)
    blocks = rng.random((batch, (height + 7) // 8, (width + 7) // 8, 3), dtype=np.float32)
    pictures = np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2)[:, :height, :width]
    noisy = pictures + rng.normal(0, 0.05, pictures.shape).astype(np.float32)
    return torch.from_numpy(np.stack([cv2.GaussianBlur(item, (3, 3), 0.8) for item in noisy]).clip(0, 1))


def as_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def cv2_canny(image: np.ndarray, low: int, high: int) -> np.ndarray:
    return cv2.Canny(cv2.cvtColor(as_uint8(image), cv2.COLOR_RGB2GRAY), low, high)


def auto_canny(plane: np.ndarray, sigma: float) -> np.ndarray:
    median = np.median(plane)
    return cv2.Canny(plane, int(max(0, (1 - sigma) * median)), int(min(255, (1 + sigma) * median)))


def assert_grey_edges(edges: torch.Tensor, expected: np.ndarray) -> None:
    assert expected.any()
    for channel in range(3):
        np.testing.assert_array_equal(edges[..., channel].numpy(), expected / np.float32(255))


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40), (65, 17), (128, 96)])
@pytest.mark.parametrize("low, high", [(100, 200), (10, 60)])
def test_canny_matches_cv2_pixel_for_pixel(ctx: RunContext, height: int, width: int, low: int, high: int) -> None:
    image = photo_like(2, height, width)
    before = image.clone()

    edges = run_node(Canny, ctx, image=image, low=low, high=high)["image"]

    assert edges.dtype == torch.float32 and edges.shape == (2, height, width, 3)
    for index in range(2):
        assert_grey_edges(edges[index], cv2_canny(image[index].numpy(), low, high))
    assert torch.equal(image, before)


def test_canny_finds_the_outline_of_a_square(ctx: RunContext) -> None:
    image = torch.zeros(1, 16, 16, 3)
    image[:, 4:12, 4:12] = 1

    edges = run_node(Canny, ctx, image=image, low=100, high=200)["image"][0, ..., 0]

    assert set(edges.unique().tolist()) == {0.0, 1.0}
    assert edges[:, :3].sum() == 0 and edges[8, 8] == 0  # nothing far from the outline
    assert edges[8, 3:5].sum() + edges[8, 11:13].sum() >= 2  # left and right sides are found


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40), (65, 17)])
@pytest.mark.parametrize("sigma", [0.33, 0.1, 0.8])
def test_adaptive_canny_takes_its_thresholds_from_the_median(ctx: RunContext, height: int, width: int,
                                                             sigma: float) -> None:
    image = photo_like(2, height, width)

    edges = run_node(Canny, ctx, image=image, thresholds="adaptive", sigma=sigma, low=0, high=0)["image"]

    for index in range(2):
        grey = cv2.cvtColor(as_uint8(image[index].numpy()), cv2.COLOR_RGB2GRAY)
        assert_grey_edges(edges[index], auto_canny(grey, sigma))


@pytest.mark.parametrize("blur", [1, 2])
def test_canny_blurs_before_finding_edges(ctx: RunContext, blur: int) -> None:
    image = photo_like(1, 48, 40)

    edges = run_node(Canny, ctx, image=image, blur=blur, low=20, high=60)["image"]

    grey = cv2.cvtColor(as_uint8(image[0].numpy()), cv2.COLOR_RGB2GRAY)
    expected = cv2.Canny(cv2.GaussianBlur(grey, (2 * blur + 1, 2 * blur + 1), 0), 20, 60)
    assert_grey_edges(edges[0], expected)
    assert not np.array_equal(expected, cv2.Canny(grey, 20, 60))  # the blur made a difference


@pytest.mark.parametrize("thresholds", ["fixed", "adaptive"])
def test_per_channel_canny_keeps_each_channels_edges_in_that_channel(ctx: RunContext, thresholds: str) -> None:
    image = photo_like(1, 40, 56)

    edges = run_node(Canny, ctx, image=image, channels="per_channel", thresholds=thresholds, blur=1,
                     low=30, high=90)["image"][0]

    rgb = as_uint8(image[0].numpy())
    for channel in range(3):
        plane = cv2.GaussianBlur(np.ascontiguousarray(rgb[..., channel]), (3, 3), 0)
        expected = auto_canny(plane, 0.33) if thresholds == "adaptive" else cv2.Canny(plane, 30, 90)
        np.testing.assert_array_equal(edges[..., channel].numpy(), expected / np.float32(255))
    assert not torch.equal(edges[..., 0], edges[..., 1])


@pytest.mark.parametrize("height, width, target_width, target_height, fit_width, fit_height", [
    (24, 40, 64, 64, 64, 38),    # wide into square: bars above and below
    (65, 17, 48, 96, 25, 96),    # tall into tall: bars left and right
    (32, 32, 40, 24, 24, 24),    # square into wide, shrunk
    (48, 96, 96, 48, 96, 48),    # exact aspect: no bars
])
def test_canny_resizes_keeping_aspect_then_pads_centred(ctx: RunContext, height: int, width: int, target_width: int,
                                                        target_height: int, fit_width: int, fit_height: int) -> None:
    image = photo_like(1, height, width)

    edges = run_node(Canny, ctx, image=image, width=target_width, height=target_height, low=20, high=60,
                     interpolation="bicubic")["image"][0]

    fitted = np.clip(cv2.resize(image[0].numpy(), (fit_width, fit_height), interpolation=cv2.INTER_CUBIC), 0, 1)
    expected = np.zeros((target_height, target_width), np.uint8)
    top, left = (target_height - fit_height) // 2, (target_width - fit_width) // 2
    expected[top:top + fit_height, left:left + fit_width] = cv2_canny(fitted, 20, 60)
    assert edges.shape == (target_height, target_width, 3)
    assert_grey_edges(edges, expected)


def test_canny_width_or_height_0_keeps_that_side_of_the_input(ctx: RunContext) -> None:
    image = photo_like(1, 24, 40)

    edges = run_node(Canny, ctx, image=image, height=64, low=20, high=60)["image"][0]

    expected = np.zeros((64, 40), np.uint8)
    expected[20:44] = cv2_canny(image[0].numpy(), 20, 60)  # fits unscaled, centred vertically
    assert_grey_edges(edges, expected)


@pytest.mark.parametrize("width, height", [(96, 64), (64, 96), (80, 80)])
@pytest.mark.parametrize("target", [(64, 64), (96, 64)])
@pytest.mark.parametrize("adaptive", [True, False])
def test_edges_first_canny_is_the_guides_adaptive_canny_preprocessor_pixel_for_pixel(
        ctx: RunContext, width: int, height: int, target: tuple[int, int], adaptive: bool) -> None:
    pixels = as_uint8(photo_like(2, height, width).numpy())
    guide = AdaptiveCannyPreprocessor(low_threshold=100, high_threshold=200, adaptive=adaptive)

    edges = run_node(Canny, ctx, image=from_uint8(pixels), thresholds="adaptive" if adaptive else "fixed",
                     low=100, high=200, width=target[0], height=target[1], resize_order="edges_first")["image"]

    for index in range(2):
        expected = np.asarray(guide(Image.fromarray(pixels[index]), target_size=target))
        assert expected.any()
        np.testing.assert_array_equal(edges[index].numpy(), expected / np.float32(255))
    if (width, height) != target:  # the guide's bilinear resize of the edge map leaves grey levels
        assert ((edges > 0) & (edges < 1)).any()


@pytest.mark.parametrize("width, height, target, rounded, truncated", [
    (96, 64, (64, 64), (64, 43), (64, 42)),
    (64, 96, (96, 64), (43, 64), (42, 64)),
    (80, 80, (96, 64), (64, 64), (64, 64)),
])
def test_image_first_rounds_the_fitted_sides_and_edges_first_truncates_them_as_the_guide(
        width: int, height: int, target: tuple[int, int], rounded: tuple[int, int],
        truncated: tuple[int, int]) -> None:
    assert fit_box(width, height, *target)[:2] == rounded
    assert fit_box(width, height, *target, truncate=True)[:2] == truncated


@pytest.mark.parametrize("channels", ["grey", "per_channel"])
def test_edges_first_keeps_thresholds_blur_and_channels_and_finds_edges_at_the_input_size(
        ctx: RunContext, channels: str) -> None:
    image = photo_like(1, 40, 56)
    options = {"thresholds": "adaptive", "blur": 1, "channels": channels}

    full = run_node(Canny, ctx, image=image, **options)["image"][0]
    fitted = run_node(Canny, ctx, image=image, width=28, height=28, resize_order="edges_first",
                      interpolation="nearest", **options)["image"][0]  # interpolation is image_first's only

    expected = np.zeros((28, 28, 3), np.uint8)
    expected[4:24] = cv2.resize(as_uint8(full.numpy()), (28, 20), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(fitted.numpy(), expected / np.float32(255))
