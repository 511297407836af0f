"""ImageScale and LatentUpscale: each method against Pillow or numpy, the size rules, and the hires-fix graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from graphflow import Engine
from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from graphflow.models import ModelManager
from nodes.latents import Latent
from nodes.upscale import ImageScale, LatentUpscale

ROOT = Path(__file__).resolve().parents[2]
PILLOW_FILTERS = {"nearest-exact": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
SIZES = [(40, 29), (7, 5), (23, 9), (17, 13)]  # from 17x13: enlarged, shrunk, both at once, unchanged


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """Two 17x13 RGB images of random values (every pixel unlike its neighbours: the filters' worst case)."""
    return torch.from_numpy(np.random.default_rng(0).random((2, 13, 17, 3), dtype=np.float32))


def scaled(ctx: RunContext, image: torch.Tensor, method: str = "bilinear", width: int = 0, height: int = 0,
           scale_by: float = 1.0, crop: str = "disabled") -> torch.Tensor:
    return ImageScale().run(ctx, image=image, method=method, width=width, height=height, scale_by=scale_by,
                            crop=crop)["image"]


def pillow_float(image: torch.Tensor, width: int, height: int, method: str, clamp: bool = True) -> np.ndarray:
    """Pillow's own float resize of [B, H, W, C], one 32-bit float ("F") channel at a time, clamped to 0..1."""
    channels = [[np.asarray(Image.fromarray(np.ascontiguousarray(item[..., c]), mode="F")
                            .resize((width, height), PILLOW_FILTERS[method])) for c in range(item.shape[-1])]
                for item in image.numpy()]
    resized = np.stack([np.stack(item, axis=-1) for item in channels])
    return np.clip(resized, 0, 1) if clamp else resized


def mean_of_covered_pixels(image: torch.Tensor, width: int, height: int) -> np.ndarray:
    """area's definition written out: output pixel i averages input pixels floor(i*n/m) .. ceil((i+1)*n/m) - 1."""
    pixels = image.numpy()
    rows, columns = pixels.shape[1:3]

    def spans(size: int, target: int) -> list[slice]:
        return [slice(i * size // target, -(-(i + 1) * size // target)) for i in range(target)]

    return np.stack([np.stack([pixels[:, r, c].mean(axis=(1, 2)) for c in spans(columns, width)], axis=1)
                     for r in spans(rows, height)], axis=1)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", list(PILLOW_FILTERS))
def test_each_method_gives_pillows_float_resize(ctx: RunContext, image: torch.Tensor, method: str,
                                                size: tuple[int, int]) -> None:
    ours = scaled(ctx, image, method, *size)
    assert ours.shape == (2, size[1], size[0], 3) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), pillow_float(image, *size, method), atol=2e-6)


@pytest.mark.parametrize("size", SIZES)
def test_area_averages_the_pixels_each_output_pixel_covers(ctx: RunContext, image: torch.Tensor,
                                                           size: tuple[int, int]) -> None:
    np.testing.assert_allclose(scaled(ctx, image, "area", *size).numpy(), mean_of_covered_pixels(image, *size),
                               atol=1e-6)


def test_nearest_exact_adds_no_new_values(ctx: RunContext, image: torch.Tensor) -> None:
    enlarged = scaled(ctx, image, "nearest-exact", scale_by=3.0)
    assert torch.equal(enlarged, image.repeat_interleave(3, dim=1).repeat_interleave(3, dim=2))


def test_overshoot_at_hard_edges_is_clamped_to_0_1(ctx: RunContext) -> None:
    step = torch.zeros(1, 8, 8, 3)
    step[:, :, 4:] = 1
    plain = [scaled(ctx, step, method, 29, 29) for method in ("bicubic", "lanczos")]
    assert all(result.min() == 0 and result.max() == 1 for result in plain)


@pytest.mark.parametrize(("width", "height", "scale_by", "expected"), [
    (0, 26, 1.0, (34, 26)),  # the width from the aspect ratio
    (34, 0, 1.0, (34, 26)),
    (0, 0, 1.5, (26, 20)),  # 17 * 1.5 = 25.5 and 13 * 1.5 = 19.5, rounded to even
    (0, 0, 1.0, (17, 13)),
    (5, 40, 1.0, (5, 40)),  # stretched
])
def test_the_size_is_width_by_height_else_keeps_the_aspect_else_scales(
        ctx: RunContext, image: torch.Tensor, width: int, height: int, scale_by: float,
        expected: tuple[int, int]) -> None:
    assert scaled(ctx, image, width=width, height=height, scale_by=scale_by).shape[1:3] == expected[::-1]


def test_a_size_and_a_factor_together_are_refused(ctx: RunContext, image: torch.Tensor) -> None:
    with pytest.raises(NodeInputError, match=r"both a size \(34x0\) and scale_by 2.0 are given"):
        scaled(ctx, image, width=34, scale_by=2.0)


def test_a_result_beyond_16384_pixels_a_side_is_refused(ctx: RunContext) -> None:
    with pytest.raises(NodeInputError, match="would be 16400x8 pixels"):
        scaled(ctx, torch.zeros(1, 1, 2050, 3), scale_by=8.0)


def test_center_crop_cuts_to_the_target_aspect_around_the_centre_first(ctx: RunContext) -> None:
    wide = torch.rand(1, 10, 30, 3)  # 3:1 to 1:1: the middle 10 columns
    assert torch.equal(scaled(ctx, wide, "bicubic", 20, 20, crop="center"),
                       scaled(ctx, wide[:, :, 10:20], "bicubic", 20, 20))
    tall = torch.rand(1, 40, 10, 3)  # 1:4 to 1:2: the middle 20 rows
    assert torch.equal(scaled(ctx, tall, "lanczos", 5, 10, crop="center"),
                       scaled(ctx, tall[:, 10:30], "lanczos", 5, 10))


def encoded_latent(columns: int = 6, rows: int = 4) -> Latent:
    """A latent as VAEEncode makes one (with the distribution and a mask), of an SD1.5 VAE's 8 pixels per latent."""
    samples = torch.rand(1, 4, rows, columns)
    return Latent(samples, "sd15", 8, False, torch.rand(1, 8, rows, columns), 0.18215,
                  torch.ones(1, rows * 8, columns * 8), torch.rand(1, 8, rows, columns))


def upscaled(ctx: RunContext, latent: Latent, method: str = "nearest-exact", width: int = 0, height: int = 0,
             scale_by: float = 1.0, crop: str = "disabled") -> Latent:
    return LatentUpscale().run(ctx, latent=latent, method=method, width=width, height=height, scale_by=scale_by,
                               crop=crop)["latent"]


def test_an_upscaled_latent_keeps_its_family_and_scale_and_is_no_longer_an_encoding(ctx: RunContext) -> None:
    latent = encoded_latent()
    result = upscaled(ctx, latent, scale_by=2.0)
    assert torch.equal(result.samples, latent.samples.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert (result.family, result.scale, result.size, result.empty) == ("sd15", 8, (96, 64), False)
    assert result.moments is result.mask is result.masked_moments is result.scaling_factor is None


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "area"])
def test_latents_are_resampled_as_images_are_but_not_clamped(ctx: RunContext, method: str) -> None:
    latent = encoded_latent()
    latent = latent.replace(samples=latent.samples * 8 - 4)  # latents range beyond 0..1
    result = upscaled(ctx, latent, method, width=80, height=24).samples
    channels_last = latent.samples.permute(0, 2, 3, 1)
    expected = mean_of_covered_pixels(channels_last, 10, 3) if method == "area" else \
        pillow_float(channels_last, 10, 3, method, clamp=False)
    assert result.shape == (1, 4, 3, 10) and result.min() < 0
    np.testing.assert_allclose(result.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize(("width", "height", "scale_by", "expected"), [
    (0, 64, 1.0, (96, 64)),  # 6x4 latents: the aspect ratio kept in whole latents
    (0, 40, 1.0, (64, 40)),  # 60 pixels is 7.5 latents, rounded to 8 (even)
    (0, 0, 1.5, (72, 48)),  # 6 * 1.5 = 9 latents, 4 * 1.5 = 6
    (0, 0, 1.25, (64, 40)),  # 7.5 -> 8 latents, 5
])
def test_latent_sizes_are_whole_latents(ctx: RunContext, width: int, height: int, scale_by: float,
                                        expected: tuple[int, int]) -> None:
    assert upscaled(ctx, encoded_latent(), width=width, height=height, scale_by=scale_by).size == expected


def test_bislerp_is_bilinear_for_latent_vectors_that_point_the_same_way(ctx: RunContext) -> None:
    lengths = torch.rand(1, 1, 4, 6, generator=torch.Generator().manual_seed(1)) + 0.1
    latent = encoded_latent().replace(samples=lengths * torch.tensor([0.2, 0.4, -0.4, 0.8]).view(1, 4, 1, 1))
    torch.testing.assert_close(upscaled(ctx, latent, "bislerp", scale_by=2.5).samples,
                               upscaled(ctx, latent, "bilinear", scale_by=2.5).samples)


def test_bislerp_keeps_the_length_of_unit_latent_vectors_where_bilinear_shrinks_them(ctx: RunContext) -> None:
    directions = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(2))
    latent = encoded_latent().replace(samples=directions / directions.norm(dim=1, keepdim=True))
    lengths = {method: upscaled(ctx, latent, method, scale_by=2.0).samples.norm(dim=1)
               for method in ("bislerp", "bilinear")}
    torch.testing.assert_close(lengths["bislerp"], torch.ones(1, 8, 12))
    assert lengths["bilinear"].min() < 0.9
    assert torch.equal(upscaled(ctx, latent, "bislerp").samples, latent.samples)  # the same size: unchanged


def test_bislerp_blends_zero_and_opposite_vectors_linearly(ctx: RunContext) -> None:
    samples = torch.zeros(1, 4, 2, 2)
    samples[0, :, 0, 0], samples[0, :, 1, 1] = torch.tensor([1.0, 0, 0, 0]), torch.tensor([-1.0, 0, 0, 0])
    latent = encoded_latent().replace(samples=samples)
    torch.testing.assert_close(upscaled(ctx, latent, "bislerp", scale_by=3.0).samples,
                               upscaled(ctx, latent, "bilinear", scale_by=3.0).samples)


def test_a_latent_size_that_is_not_whole_latents_is_refused(ctx: RunContext) -> None:
    with pytest.raises(NodeInputError, match="100x0; each must be a multiple of 8"):
        upscaled(ctx, encoded_latent(), width=100)


def test_latent_center_crop_cuts_whole_latents(ctx: RunContext) -> None:
    latent = encoded_latent(columns=12, rows=4)
    result = upscaled(ctx, latent, width=64, height=64, crop="center")
    assert torch.equal(result.samples, latent.samples[:, :, :, 4:8].repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_an_empty_latent_is_refused_with_what_to_do_instead(ctx: RunContext) -> None:
    with pytest.raises(NodeInputError, match="EmptyLatent the upscaled size instead"):
        upscaled(ctx, Latent(torch.zeros(1, 4, 8, 8), empty=True), scale_by=2.0)


@pytest.fixture(scope="module")
def engine(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine(input_dirs=[ROOT, tiny_models], output_dir=tmp_path_factory.mktemp("hires") / "out",
                  models=ModelManager())


def test_the_hires_fix_graph_renders_at_the_upscaled_size_and_a_new_strength_reruns_only_the_second_pass(
        engine: Engine, tiny_models: Path) -> None:
    params = {"checkpoint": str(tiny_models / "sd15"), "controlnet": str(tiny_models / "controlnet-canny"),
              "width": 64, "height": 48, "steps": 4}
    first = engine.run(ROOT / "graphs" / "hires_fix.json", params)
    assert first.outputs["first"].shape == (1, 48, 64, 3)
    assert first.outputs["image"].shape == first.outputs["edges"].shape == (1, 96, 128, 3)
    assert [path.name for path in first.files] == ["hires_fix_00000.png"]
    lighter = engine.run(ROOT / "graphs" / "hires_fix.json", params | {"strength": 0.25})
    assert set(lighter.ran) == {"second", "decode", "save"}
    assert {"upscale", "control", "preview", "edges"} <= set(lighter.cached)  # the first pass is not even looked at
    assert not torch.equal(lighter.outputs["image"], first.outputs["image"])
