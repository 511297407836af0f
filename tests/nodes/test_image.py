import json
from importlib.metadata import version
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import nodes.image
from graphflow.context import RunContext
from graphflow.document import dumps
from graphflow.errors import Code, NodeInputError
from graphflow.paths import PathError
from nodes.image import LoadImage, LoadMask, ResizePad, SaveImage

RNG = np.random.default_rng(0)


def random_rgba(height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 4), dtype=np.uint8)


def as_float(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / 255


def test_load_image_maps_transparent_to_repaint_and_opaque_to_keep(ctx: RunContext, input_dir: Path) -> None:
    rgba = random_rgba(3, 5)
    rgba[..., 3] = [0, 128, 255, 255, 0]
    Image.fromarray(rgba, "RGBA").save(input_dir / "a.png")

    out = LoadImage().run(ctx, path="a.png")

    assert out["image"].dtype == torch.float32 and out["image"].shape == (1, 3, 5, 3)
    np.testing.assert_array_equal(out["image"][0].numpy(), as_float(rgba[..., :3]))
    assert out["mask"].shape == (1, 3, 5)
    np.testing.assert_array_equal(out["mask"][0].numpy(), 1 - as_float(rgba[..., 3]))
    assert out["mask"][0, 0].tolist() == pytest.approx([1, 1 - 128 / 255, 0, 0, 1])


def test_load_image_without_alpha_has_an_all_zero_mask(ctx: RunContext, input_dir: Path) -> None:
    rgb = random_rgba(4, 6)[..., :3]
    Image.fromarray(rgb, "RGB").save(input_dir / "a.png")

    out = LoadImage().run(ctx, path="a.png")

    np.testing.assert_array_equal(out["image"][0].numpy(), as_float(rgb))
    assert torch.equal(out["mask"], torch.zeros(1, 4, 6))


def test_load_image_converts_grey_to_rgb(ctx: RunContext, input_dir: Path) -> None:
    grey = random_rgba(4, 6)[..., 0]
    Image.fromarray(grey, "L").save(input_dir / "a.png")

    image = LoadImage().run(ctx, path="a.png")["image"][0].numpy()

    np.testing.assert_array_equal(image, np.repeat(as_float(grey)[..., None], 3, axis=-1))


def test_load_image_keeps_the_full_range_of_16_bit_grey(ctx: RunContext, input_dir: Path) -> None:
    grey = np.array([[0, 1000, 30000], [40000, 60000, 65535]], dtype=np.uint16)
    Image.fromarray(grey).save(input_dir / "depth.png")

    image = LoadImage().run(ctx, path="depth.png")["image"][0].numpy()

    np.testing.assert_allclose(image, np.repeat(grey[..., None] / 65535, 3, axis=-1), atol=1e-7)


def test_load_image_reads_palette_colours_and_transparent_index(ctx: RunContext, input_dir: Path) -> None:
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    picture = Image.fromarray(indices, "P")
    picture.putpalette(palette.flatten().tolist())
    picture.save(input_dir / "p.png", transparency=1)

    out = LoadImage().run(ctx, path="p.png")

    np.testing.assert_array_equal(out["image"][0].numpy(), as_float(palette[indices]))
    np.testing.assert_array_equal(out["mask"][0].numpy(), (indices == 1).astype(np.float32))


def test_load_image_applies_exif_orientation(ctx: RunContext, input_dir: Path) -> None:
    rgb = random_rgba(3, 5)[..., :3]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(rgb, "RGB").save(input_dir / "rotated.png", exif=exif)

    image = LoadImage().run(ctx, path="rotated.png")["image"][0].numpy()

    np.testing.assert_array_equal(image, as_float(np.rot90(rgb, k=-1)))


def test_load_image_refuses_paths_outside_the_input_directory(
    ctx: RunContext, input_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(outside)
    (input_dir / "link.png").symlink_to(outside)

    for path in ("../secret.png", str(outside), "link.png"):
        with pytest.raises(PathError) as raised:
            LoadImage().run(ctx, path=path)
        assert raised.value.error.code == Code.PATH_OUTSIDE_ROOT
        assert raised.value.error.node == "n" and raised.value.error.input == "path"


def test_load_image_reports_a_missing_file(ctx: RunContext) -> None:
    with pytest.raises(PathError) as raised:
        LoadImage().run(ctx, path="missing.png")
    assert raised.value.error.code == Code.FILE_NOT_FOUND


def test_load_image_rejects_a_file_that_is_not_an_image(ctx: RunContext, input_dir: Path) -> None:
    (input_dir / "notes.png").write_text("not a picture")
    with pytest.raises(NodeInputError, match=r"notes\.png"):
        LoadImage().run(ctx, path="notes.png")


@pytest.mark.parametrize("channel, index", [("red", 0), ("green", 1), ("blue", 2)])
def test_load_mask_takes_one_colour_channel(ctx: RunContext, input_dir: Path, channel: str, index: int) -> None:
    rgba = random_rgba(4, 7)
    Image.fromarray(rgba, "RGBA").save(input_dir / "m.png")

    mask = LoadMask().run(ctx, path="m.png", channel=channel)["mask"]

    assert mask.shape == (1, 4, 7)
    np.testing.assert_array_equal(mask[0].numpy(), as_float(rgba[..., index]))


def test_load_mask_luminance_is_bt601_luma(ctx: RunContext, input_dir: Path) -> None:
    rgb = random_rgba(4, 7)[..., :3]
    rgb[0, :3] = [[255, 255, 255], [0, 0, 0], [255, 0, 0]]
    Image.fromarray(rgb, "RGB").save(input_dir / "m.png")

    mask = LoadMask().run(ctx, path="m.png", channel="luminance")["mask"][0].numpy()

    np.testing.assert_allclose(mask, as_float(rgb) @ np.array([0.299, 0.587, 0.114]), atol=1e-6)
    assert mask[0, :3] == pytest.approx([1, 0, 0.299])


def test_load_mask_alpha_marks_transparent_pixels_like_load_image(ctx: RunContext, input_dir: Path) -> None:
    rgba = random_rgba(4, 7)
    Image.fromarray(rgba, "RGBA").save(input_dir / "m.png")
    Image.fromarray(rgba[..., :3], "RGB").save(input_dir / "opaque.png")

    mask = LoadMask().run(ctx, path="m.png", channel="alpha")["mask"]
    opaque = LoadMask().run(ctx, path="opaque.png", channel="alpha")["mask"]

    assert torch.equal(mask, LoadImage().run(ctx, path="m.png")["mask"])
    np.testing.assert_array_equal(mask[0].numpy(), 1 - as_float(rgba[..., 3]))
    assert torch.equal(opaque, torch.zeros(1, 4, 7))


def read_png(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    with Image.open(path) as picture:
        return np.asarray(picture), dict(picture.text)


def test_save_image_writes_one_png_per_batch_item(ctx: RunContext, output_dir: Path) -> None:
    images = torch.rand(2, 6, 9, 3, generator=torch.Generator().manual_seed(0))
    before = images.clone()

    paths = SaveImage().run(ctx, image=images, prefix="graphflow")["paths"]

    assert paths == [str(output_dir / "graphflow_00000.png"), str(output_dir / "graphflow_00001.png")]
    assert ctx.written == [Path(path) for path in paths]
    for path, image in zip(paths, images, strict=True):
        pixels, _ = read_png(Path(path))
        np.testing.assert_array_equal(pixels, np.round(image.numpy() * 255).astype(np.uint8))
    assert torch.equal(images, before)


def test_save_image_embeds_document_params_and_versions(ctx: RunContext) -> None:
    ctx.document = {"graphflow": 1, "nodes": {"save": {"type": "SaveImage", "inputs": {"prefix": "x"}}}}
    ctx.params = {"prompt": "un café ☕", "seed": 7}

    path = SaveImage().run(ctx, image=torch.zeros(1, 4, 4, 3), prefix="graphflow")["paths"][0]

    _, text = read_png(Path(path))
    assert set(text) == {"graphflow", "params", "versions", "run"}
    assert text["graphflow"] == dumps(ctx.document)
    assert text["params"] == '{"prompt": "un café ☕", "seed": 7}'
    versions = json.loads(text["versions"])
    assert set(versions) == {"graphflow", "torch", "diffusers", "transformers", "numpy", "pillow"}
    assert versions["torch"] == version("torch") and versions["pillow"] == version("pillow")


def test_save_image_without_a_document_embeds_params_only(ctx: RunContext) -> None:
    path = SaveImage().run(ctx, image=torch.zeros(1, 4, 4, 3), prefix="graphflow")["paths"][0]

    _, text = read_png(Path(path))
    assert set(text) == {"params", "versions", "run"} and text["params"] == "{}"
    run = json.loads(text["run"])
    assert set(run) == {"device", "dtype", "models", "seeds"} and run["models"] == run["seeds"] == {}


def test_save_image_continues_after_the_highest_existing_counter(ctx: RunContext, output_dir: Path) -> None:
    output_dir.mkdir()
    for name in ("room_00000.png", "room_00004.png", "other_00009.png"):
        (output_dir / name).write_bytes(b"keep")

    paths = SaveImage().run(ctx, image=torch.zeros(2, 4, 4, 3), prefix="room")["paths"]

    assert [Path(path).name for path in paths] == ["room_00005.png", "room_00006.png"]
    assert all((output_dir / name).read_bytes() == b"keep" for name in ("room_00000.png", "room_00004.png"))


def test_save_image_skips_numbers_taken_after_it_looked(
    ctx: RunContext, output_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output_dir.mkdir()
    (output_dir / "room_00000.png").write_bytes(b"keep")
    (output_dir / "room_00001.png").write_bytes(b"keep")
    monkeypatch.setattr(nodes.image, "_first_unused_counter", lambda ctx, prefix: 0)  # as if another process raced

    paths = SaveImage().run(ctx, image=torch.zeros(1, 4, 4, 3), prefix="room")["paths"]

    assert paths == [str(output_dir / "room_00002.png")]
    assert (output_dir / "room_00000.png").read_bytes() == b"keep"
    assert (output_dir / "room_00001.png").read_bytes() == b"keep"


def test_save_image_prefix_may_name_subdirectories(ctx: RunContext, output_dir: Path) -> None:
    paths = SaveImage().run(ctx, image=torch.zeros(1, 4, 4, 3), prefix="renders/room")["paths"]

    assert paths == [str(output_dir / "renders" / "room_00000.png")]
    assert Path(paths[0]).is_file()


@pytest.mark.parametrize("prefix", ["../x", "renders/../../x", "/tmp/x"])
def test_save_image_refuses_prefixes_that_leave_the_output_directory(
    ctx: RunContext, tmp_path: Path, prefix: str
) -> None:
    with pytest.raises(PathError) as raised:
        SaveImage().run(ctx, image=torch.zeros(1, 4, 4, 3), prefix=prefix)

    assert raised.value.error.code == Code.PATH_OUTSIDE_ROOT and raised.value.error.input == "prefix"
    assert not (tmp_path / "x_00000.png").exists() and ctx.written == []


def test_save_image_result_is_stale_once_a_file_is_deleted(ctx: RunContext) -> None:
    node = SaveImage()
    outputs = node.run(ctx, image=torch.zeros(2, 4, 4, 3), prefix="graphflow")

    assert node.outputs_still_valid(outputs)
    Path(outputs["paths"][1]).unlink()
    assert not node.outputs_still_valid(outputs)


def test_resize_pad_centres_a_wide_image_and_masks_the_bands(ctx: RunContext) -> None:
    image = torch.rand(2, 4, 8, 3, generator=torch.Generator().manual_seed(1))

    out = ResizePad().run(ctx, image=image, width=16, height=16, interpolation="nearest", pad_value=0.25)

    assert out["image"].shape == (2, 16, 16, 3) and out["mask"].shape == (2, 16, 16)
    upscaled = image.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    assert torch.equal(out["image"][:, 4:12], upscaled)
    assert torch.all(out["image"][:, :4] == 0.25) and torch.all(out["image"][:, 12:] == 0.25)
    expected_mask = torch.ones(2, 16, 16)
    expected_mask[:, 4:12] = 0
    assert torch.equal(out["mask"], expected_mask)


@pytest.mark.parametrize("interpolation, flag", [("bilinear", cv2.INTER_LINEAR), ("area", cv2.INTER_AREA)])
def test_resize_pad_centres_a_tall_image_resized_like_cv2(ctx: RunContext, interpolation: str, flag: int) -> None:
    image = torch.rand(1, 6, 3, 3, generator=torch.Generator().manual_seed(2))

    out = ResizePad().run(ctx, image=image, width=10, height=8, interpolation=interpolation, pad_value=1.0)

    # scale min(10/3, 8/6) = 4/3 fits the 3x6 picture to 4x8, centred 3 pixels from the left
    expected = np.clip(cv2.resize(image[0].numpy(), (4, 8), interpolation=flag), 0, 1)
    np.testing.assert_array_equal(out["image"][0, :, 3:7].numpy(), expected)
    assert torch.all(out["image"][0, :, :3] == 1) and torch.all(out["image"][0, :, 7:] == 1)
    assert torch.all(out["mask"][0, :, 3:7] == 0)
    assert torch.all(out["mask"][0, :, :3] == 1) and torch.all(out["mask"][0, :, 7:] == 1)


def test_resize_pad_keeps_lanczos_overshoot_inside_0_to_1(ctx: RunContext) -> None:
    checkerboard = torch.tensor([[0.0, 1.0] * 4, [1.0, 0.0] * 4] * 4).unsqueeze(-1).expand(-1, -1, 3)[None]

    image = ResizePad().run(ctx, image=checkerboard, width=32, height=32, interpolation="lanczos",
                            pad_value=0.0)["image"]

    assert image.min() >= 0 and image.max() <= 1
