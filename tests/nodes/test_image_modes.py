"""LoadImage across the pixel modes Pillow hands back for PNG, TIFF, JPEG, WebP, GIF/APNG, BMP and PPM: each
loads with its exact 0..1 values (16-bit / 65535, floats as they are) or is refused naming the mode and the values."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from nodes.image import LoadImage, LoadMask

RNG = np.random.default_rng(3)


def u8(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def u16(*shape: int) -> np.ndarray:
    values = RNG.integers(0, 65536, shape, dtype=np.uint16)
    values.flat[:2] = (0, 65535)  # both ends of the range, where clipping or scaling errors show
    return values


def save(picture: Image.Image, name: str, directory: Path, **options: object) -> str:
    picture.save(directory / name, **options)
    return name


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(values: np.ndarray, colour: int, extra: bytes = b"") -> bytes:
    """A 16-bit PNG (grey 0, RGB 2, grey+alpha 4, RGBA 6), written by hand: Pillow writes none in colour."""
    height, width = values.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0))
            + extra + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def load(ctx: RunContext, name: str) -> tuple[np.ndarray, np.ndarray]:
    out = LoadImage().run(ctx, path=name)
    assert str(out["image"].dtype) == str(out["mask"].dtype) == "torch.float32"
    return out["image"][0].numpy(), out["mask"][0].numpy()


def grey3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1)


def test_8_bit_png_modes_load_as_value_over_255(ctx: RunContext, input_dir: Path) -> None:
    grey, rgb = u8(3, 5), u8(3, 5, 3)
    cases = {
        "l.png": (Image.fromarray(grey, "L"), grey3(grey)),
        "rgb.png": (Image.fromarray(rgb, "RGB"), rgb),
        "bits.png": (Image.fromarray(grey > 127), grey3((grey > 127).astype(np.uint8) * 255)),
    }
    for name, (picture, expected) in cases.items():
        image, mask = load(ctx, save(picture, name, input_dir))
        np.testing.assert_array_equal(image, expected.astype(np.float32) / 255, err_msg=name)
        assert not mask.any(), name


def test_grey_and_alpha_png_keeps_both(ctx: RunContext, input_dir: Path) -> None:
    pixels = u8(3, 5, 2)
    image, mask = load(ctx, save(Image.fromarray(pixels, "LA"), "la.png", input_dir))

    np.testing.assert_array_equal(image, grey3(pixels[..., 0]).astype(np.float32) / 255)
    np.testing.assert_array_equal(mask, 1 - pixels[..., 1].astype(np.float32) / 255)


@pytest.mark.parametrize("mode, key", [("L", 40), ("RGB", (40, 50, 60))])
def test_a_transparent_colour_key_marks_exactly_those_pixels(ctx: RunContext, input_dir: Path, mode: str,
                                                              key: int | tuple[int, ...]) -> None:
    pixels = u8(4, 4, 3) if mode == "RGB" else u8(4, 4)
    pixels[1, 2] = key
    image, mask = load(ctx, save(Image.fromarray(pixels, mode), "key.png", input_dir, transparency=key))

    expected = np.zeros((4, 4), np.float32)
    expected[1, 2] = 1
    np.testing.assert_array_equal(mask, expected)
    assert image.shape == (4, 4, 3)


def test_a_palette_with_partial_alpha_gives_a_partial_mask(ctx: RunContext, input_dir: Path) -> None:
    indices = np.array([[0, 1, 2]], dtype=np.uint8)
    picture = Image.fromarray(indices, "P")
    picture.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    image, mask = load(ctx, save(picture, "p.png", input_dir, transparency=bytes([255, 128, 0])))

    np.testing.assert_array_equal(image[0], np.eye(3, dtype=np.float32))
    np.testing.assert_array_equal(mask[0], 1 - np.array([255, 128, 0], np.float32) / 255)


def test_16_bit_grey_png_with_a_transparent_value(ctx: RunContext, input_dir: Path) -> None:
    values = u16(3, 4)
    values[2, 3] = 1234
    (input_dir / "g16.png").write_bytes(png16(values, 0, chunk(b"tRNS", struct.pack(">H", 1234))))

    image, mask = load(ctx, "g16.png")

    np.testing.assert_array_equal(image, grey3(values.astype(np.float32) / 65535))
    assert mask.sum() == 1 and mask[2, 3] == 1


@pytest.mark.parametrize("colour, bands", [(2, 3), (6, 4), (4, 2)], ids=["RGB16", "RGBA16", "LA16"])
def test_16_bit_colour_png_keeps_all_16_bits(ctx: RunContext, input_dir: Path, colour: int, bands: int) -> None:
    values = u16(3, 4, bands)
    (input_dir / "c16.png").write_bytes(png16(values, colour))

    image, mask = load(ctx, "c16.png")

    scaled = values.astype(np.float32) / 65535
    colours = scaled[..., :3] if bands >= 3 else grey3(scaled[..., 0])
    np.testing.assert_array_equal(image, colours)
    np.testing.assert_array_equal(mask, 1 - scaled[..., -1] if bands in (2, 4) else np.zeros((3, 4), np.float32))


def test_16_bit_rgb_png_with_a_transparent_colour(ctx: RunContext, input_dir: Path) -> None:
    values = u16(2, 3, 3)
    values[1, 1] = (1, 2, 3)
    (input_dir / "k16.png").write_bytes(png16(values, 2, chunk(b"tRNS", struct.pack(">HHH", 1, 2, 3))))

    image, mask = load(ctx, "k16.png")

    np.testing.assert_array_equal(image, values.astype(np.float32) / 65535)
    np.testing.assert_array_equal(mask, np.array([[0, 0, 0], [0, 1, 0]], np.float32))


def tiff(directory: Path, name: str, values: np.ndarray, **options: object) -> str:
    tifffile.imwrite(directory / name, values, **options)
    return name


def test_float_tiff_within_0_to_1_is_used_as_it_is(ctx: RunContext, input_dir: Path) -> None:
    values = RNG.random((4, 6), dtype=np.float32)
    values[0, :2] = (0.0, 1.0)

    image, _ = load(ctx, tiff(input_dir, "f.tif", values))

    np.testing.assert_array_equal(image, grey3(values))


@pytest.mark.parametrize("values, found", [
    (np.array([[0.0, 0.5], [1.5, -0.25]], np.float32), "found values in -0.25..1.5"),
    (np.array([[0.0, np.nan], [np.inf, 0.5]], np.float32), "found values in 0..0.5 and 2 NaN or infinite"),
    (np.array([[np.nan]], np.float32), "found no finite values and 1 NaN or infinite"),
], ids=["out-of-range", "nan-and-inf", "all-nan"])
def test_float_tiff_outside_0_to_1_is_refused_with_the_values_found(ctx: RunContext, input_dir: Path,
                                                                   values: np.ndarray, found: str) -> None:
    name = tiff(input_dir, "f.tif", values)

    with pytest.raises(NodeInputError, match=r"f\.tif: its 32-bit float pixels \(mode F\) must be finite and within "
                                             r"0\.\.1; " + found.replace(".", r"\.")):
        LoadImage().run(ctx, path=name)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint32, np.int16])
def test_integer_tiff_within_16_bits_loads_as_value_over_65535(ctx: RunContext, input_dir: Path,
                                                               dtype: type) -> None:
    values = RNG.integers(0, 32768, (3, 5)).astype(dtype)

    image, _ = load(ctx, tiff(input_dir, "i.tif", values))

    np.testing.assert_array_equal(image, grey3(values.astype(np.float32) / 65535))


@pytest.mark.parametrize("values, found", [
    (np.array([[0, 70000]], np.int32), "0..70000"),
    (np.array([[-5, 100]], np.int16), "-5..100"),
    (np.array([[0, 3_000_000_000]], np.uint32), "-1294967296..0"),  # Pillow reads uint32 as signed mode I
])
def test_integer_tiff_beyond_16_bits_is_refused_with_the_values_found(ctx: RunContext, input_dir: Path,
                                                                      values: np.ndarray, found: str) -> None:
    name = tiff(input_dir, "i.tif", values)

    with pytest.raises(NodeInputError, match=rf"i\.tif: its 32-bit integer pixels \(mode I\) range over {found}; "
                                             r"only values in 0\.\.65535"):
        LoadImage().run(ctx, path=name)


def test_16_bit_rgb_tiff_keeps_all_16_bits(ctx: RunContext, input_dir: Path) -> None:
    values = u16(3, 4, 3)

    image, _ = load(ctx, tiff(input_dir, "rgb16.tif", values, photometric="rgb"))

    np.testing.assert_array_equal(image, values.astype(np.float32) / 65535)


def test_multi_page_tiff_loads_its_first_page(ctx: RunContext, input_dir: Path) -> None:
    pages = u8(3, 4, 5)

    image, _ = load(ctx, tiff(input_dir, "pages.tif", pages, photometric="minisblack"))

    np.testing.assert_array_equal(image, grey3(pages[0]).astype(np.float32) / 255)


def test_a_mode_without_an_exact_rgb_conversion_is_refused_by_name(ctx: RunContext, input_dir: Path) -> None:
    name = save(Image.new("LAB", (2, 2), (50, 10, 10)), "lab.tif", input_dir)

    with pytest.raises(NodeInputError, match=r"lab\.tif: its pixel mode LAB has no exact RGB conversion"):
        LoadImage().run(ctx, path=name)


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_jpeg_modes_load_as_pillow_decodes_them(ctx: RunContext, input_dir: Path, mode: str) -> None:
    name = save(Image.fromarray(u8(8, 8, 3), "RGB").convert(mode), f"{mode}.jpg", input_dir, quality=90)

    image, mask = load(ctx, name)

    with Image.open(input_dir / name) as decoded:
        assert decoded.mode == mode
        np.testing.assert_array_equal(image, np.asarray(decoded.convert("RGB"), np.float32) / 255)
    assert not mask.any()


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_lossless_webp_loads_exactly(ctx: RunContext, input_dir: Path, mode: str) -> None:
    pixels = u8(4, 6, len(mode))
    pixels[..., 3:] = np.maximum(pixels[..., 3:], 1)  # WebP drops the colour of fully transparent pixels

    image, mask = load(ctx, save(Image.fromarray(pixels, mode), "a.webp", input_dir, lossless=True, exact=True))

    np.testing.assert_array_equal(image, pixels[..., :3].astype(np.float32) / 255)
    expected = 1 - pixels[..., 3].astype(np.float32) / 255 if mode == "RGBA" else np.zeros((4, 6), np.float32)
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("format, name", [("GIF", "anim.gif"), ("PNG", "anim.png"), ("WEBP", "anim.webp")])
def test_an_animation_loads_its_first_frame(ctx: RunContext, input_dir: Path, format: str, name: str) -> None:
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], dtype=np.uint8)
    frames = [palette[RNG.integers(0, 4, (4, 6))] for _ in range(3)]
    pictures = [Image.fromarray(frame, "RGB") for frame in frames]
    options = {"lossless": True} if format == "WEBP" else {}
    pictures[0].save(input_dir / name, format=format, save_all=True, append_images=pictures[1:], **options)

    image, _ = load(ctx, name)

    np.testing.assert_array_equal(image, frames[0].astype(np.float32) / 255)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB"])
def test_bmp_modes_load_exactly(ctx: RunContext, input_dir: Path, mode: str) -> None:
    picture = Image.fromarray(u8(4, 5, 3), "RGB").convert(mode)

    image, _ = load(ctx, save(picture, "a.bmp", input_dir))

    np.testing.assert_array_equal(image, np.asarray(picture.convert("RGB"), np.float32) / 255)


@pytest.mark.parametrize("maxval", [65535, 1000])
def test_16_bit_ppm_keeps_its_depth(ctx: RunContext, input_dir: Path, maxval: int) -> None:
    colour = RNG.integers(0, maxval + 1, (2, 3, 3)).astype(">u2")
    grey = RNG.integers(0, maxval + 1, (2, 3)).astype(">u2")
    (input_dir / "c.ppm").write_bytes(f"P6 3 2 {maxval}\n".encode() + colour.tobytes())
    (input_dir / "g.pgm").write_bytes(f"P5 3 2 {maxval}\n".encode() + grey.tobytes())

    image, _ = load(ctx, "c.ppm")
    np.testing.assert_array_equal(image, colour.astype(np.float32) / maxval)
    image, _ = load(ctx, "g.pgm")  # Pillow rescales grey to 0..65535 itself
    np.testing.assert_allclose(image, grey3(grey.astype(np.float32) / maxval), atol=0.5 / 65535)


def test_16_bit_plain_text_ppm_keeps_its_depth(ctx: RunContext, input_dir: Path) -> None:
    (input_dir / "c.ppm").write_bytes(b"P3\n2 1\n1000\n1000 500 0  0 1 999\n")

    image, _ = load(ctx, "c.ppm")

    np.testing.assert_array_equal(image, np.array([[[1000, 500, 0], [0, 1, 999]]], np.float32) / 1000)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_the_image_as_pillow_does(ctx: RunContext, input_dir: Path,
                                                               orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    picture = Image.fromarray(u8(3, 5, 3), "RGB")
    save(picture, "o.png", input_dir, exif=exif)

    image, _ = load(ctx, "o.png")

    with Image.open(input_dir / "o.png") as stored:
        np.testing.assert_array_equal(image, np.asarray(ImageOps.exif_transpose(stored), np.float32) / 255)


def test_exif_orientation_turns_16_bit_colour_too(ctx: RunContext, input_dir: Path) -> None:
    values = u16(3, 5, 3)
    exif = b"MM\0*" + struct.pack(">IHHHIHH", 8, 1, 0x0112, 3, 1, 6, 0) + b"\0\0\0\0"  # orientation 6
    (input_dir / "o16.png").write_bytes(png16(values, 2, chunk(b"eXIf", exif)))

    image, _ = load(ctx, "o16.png")

    np.testing.assert_array_equal(image, np.rot90(values, k=-1).astype(np.float32) / 65535)


def test_load_mask_reads_16_bit_alpha_and_luminance(ctx: RunContext, input_dir: Path) -> None:
    values = u16(3, 4, 2)
    (input_dir / "la16.png").write_bytes(png16(values, 4))

    alpha = LoadMask().run(ctx, path="la16.png", channel="alpha")["mask"][0].numpy()
    luminance = LoadMask().run(ctx, path="la16.png", channel="luminance")["mask"][0].numpy()

    np.testing.assert_array_equal(alpha, 1 - values[..., 1].astype(np.float32) / 65535)
    np.testing.assert_allclose(luminance, values[..., 0].astype(np.float32) / 65535, atol=1e-6)


def test_the_bytes_read_are_the_bytes_decoded(ctx: RunContext, input_dir: Path) -> None:
    pixels = u8(2, 3, 3)
    first = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(first, "PNG")
    Image.fromarray(255 - pixels, "RGB").save(input_dir / "a.png")  # the file on disk changed after hashing
    ctx.file_bytes = {"path": first.getvalue()}

    image, _ = load(ctx, "a.png")

    np.testing.assert_array_equal(image, pixels.astype(np.float32) / 255)
