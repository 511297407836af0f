"""LoadImage and LoadMask on malformed, hostile and oversized files: each fails with a NodeInputError that names the
file and the problem (never a bare PIL, struct or SyntaxError), and nothing is decoded past the pixel limit."""

from __future__ import annotations

import io
import struct
import threading
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from graphflow import Engine, Graph
from graphflow.context import RunContext
from graphflow.errors import Code, NodeExecutionError, NodeInputError
from graphflow.events import CancelToken
from graphflow.paths import PathError, PathPolicy
from nodes.image import LoadImage, LoadMask

RNG = np.random.default_rng(7)


def encoded(picture: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=format, **options)
    return buffer.getvalue()


def sample(mode: str = "RGB", size: tuple[int, int] = (16, 12)) -> Image.Image:
    bands = len(Image.new(mode, (1, 1)).getbands())
    return Image.fromarray(RNG.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8).squeeze(-1)
                           if bands == 1 else RNG.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8), mode)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png(width: int, height: int, *, depth: int = 8, colour: int = 2, extra: bytes = b"",
        rows: bytes | None = None, interlace: int = 0) -> bytes:
    """A PNG built chunk by chunk, so headers can say what no encoder would write."""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace))
    pixels = rows if rows is not None else zlib.compress(b"\0" * 64)
    return PNG_SIGNATURE + header + extra + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
GREY_5X3 = np.arange(15, dtype=np.uint8).reshape(3, 5) * 17


def interlaced_grey(pixels: np.ndarray, trim: int = 0) -> bytes:
    """An Adam7-interlaced 8-bit grey PNG of `pixels` (no encoder here writes one), its data short by `trim` bytes."""
    passes = [pixels[y::dy, x::dx] for x, y, dx, dy in ADAM7]
    raw = b"".join(b"\0" + row.tobytes() for sub in passes if sub.size for row in sub)
    return png(pixels.shape[1], pixels.shape[0], colour=0, rows=zlib.compress(raw[:len(raw) - trim]), interlace=1)


def exif_orientation(value: bytes, kind: int = 3, count: int = 1) -> bytes:
    """A big-endian EXIF block (TIFF header + one IFD) whose only entry is the orientation tag."""
    return b"MM\0*" + struct.pack(">IHHHI", 8, 1, 0x0112, kind, count) + value.ljust(4, b"\0") + b"\0\0\0\0"


def png_with(extra: bytes) -> bytes:
    """A valid 16x12 RGB PNG with `extra` chunks inserted after IHDR."""
    data = encoded(sample(), "PNG")
    return data[:33] + extra + data[33:]


def cut(data: bytes, fraction: float) -> bytes:
    return data[:int(len(data) * fraction)]


def with_byte(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + bytes([value]) + data[offset + 1:]


def tiff(array: np.ndarray, **options: object) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


VALID_PNG = encoded(sample(), "PNG")
VALID_JPEG = encoded(sample(), "JPEG")
VALID_GIF = encoded(sample("P"), "GIF")
VALID_BMP = encoded(sample(), "BMP")
VALID_TIFF = encoded(sample(), "TIFF")
VALID_WEBP = encoded(sample(), "WEBP", lossless=True)

# name -> (file bytes, a phrase the error must contain)
MALFORMED: dict[str, tuple[Callable[[], bytes], str]] = {
    "zero_bytes.png": (lambda: b"", "not an image in a supported format"),
    "random_bytes.png": (lambda: RNG.bytes(512), "not an image in a supported format"),
    "text_file.png": (lambda: b"a shopping list, not a picture\n", "starts with b'a shopping l"),
    "svg_text.png": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9"/>', "supported format"),
    "eps_would_run_ghostscript.png": (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n", "supported format"),
    "ico_unsupported.png": (lambda: encoded(sample(), "ICO"), "supported format"),
    "png_signature_only.png": (lambda: PNG_SIGNATURE, "header is broken"),
    "png_truncated_in_ihdr.png": (lambda: VALID_PNG[:20], "header is broken"),
    "png_truncated_in_idat.png": (lambda: cut(VALID_PNG, 0.6), "pixel data is broken"),
    "png_bad_ihdr_crc.png": (lambda: with_byte(VALID_PNG, 29, VALID_PNG[29] ^ 0xFF), "header is broken"),
    "png_corrupt_zlib_stream.png": (lambda: png(4, 4, rows=b"\x78\x9c" + RNG.bytes(40)), "pixel data is broken"),
    "png_too_few_rows.png": (lambda: png(4, 400, rows=zlib.compress(b"\0" * 13 * 3)),
                             "its image data ends after 39 of the 5,200 bytes its 4 x 400 pixels need"),
    "png_interlaced_too_few_rows.png": (lambda: interlaced_grey(GREY_5X3, trim=6),
                                        "its image data ends after 16 of the 22 bytes its 5 x 3 pixels need"),
    "png_zero_width.png": (lambda: png(0, 5), "header is broken"),
    "png_zero_height.png": (lambda: png(5, 0), "header is broken"),
    "png_bit_depth_3.png": (lambda: png(4, 4, depth=3), "header is broken"),
    "png_colour_type_5.png": (lambda: png(4, 4, colour=5), "header is broken"),
    "png_palette_without_plte.png": (lambda: png(4, 4, colour=3, rows=zlib.compress(b"\0" * 20)),
                                     "a palette image without a palette"),
    "png_9000x9000_bomb.png": (lambda: png(9000, 9000), "9000 x 9000 = 81,000,000 pixels"),
    "png_10000x10000_pillow_warns.png": (lambda: png(10000, 10000), "more than the limit of 67,108,864"),
    "png_100000x100000_pillow_refuses.png": (lambda: png(100000, 100000), "--max-image-pixels 10000000000"),
    "png_ztxt_bomb.png": (lambda: png_with(chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"\0" * (2 << 20)))),
                          "header is broken"),
    "png_iccp_bomb.png": (lambda: png_with(chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * (2 << 20)))),
                          "header is broken"),
    "png_exif_orientation_9.png": (lambda: png_with(chunk(b"eXIf", exif_orientation(b"\0\x09"))),
                                   "EXIF orientation is 9; expected one of 1..8"),
    "png_exif_orientation_text.png": (lambda: png_with(chunk(b"eXIf", exif_orientation(b"6\0", kind=2, count=2))),
                                      "EXIF orientation is '6'"),
    "jpeg_soi_only.jpg": (lambda: b"\xff\xd8\xff", "is broken"),
    "jpeg_truncated.jpg": (lambda: cut(VALID_JPEG, 0.5), "is broken"),
    "jpeg_truncated_in_scan.jpg": (lambda: VALID_JPEG[:VALID_JPEG.index(b"\xff\xda") + 40], "pixel data is broken"),
    "jpeg_header_only.jpg": (lambda: VALID_JPEG[:VALID_JPEG.index(b"\xff\xda")], "is broken"),
    "gif_header_only.gif": (lambda: VALID_GIF[:13], "is broken"),
    "gif_truncated.gif": (lambda: cut(VALID_GIF, 0.7), "is broken"),
    "bmp_truncated.bmp": (lambda: cut(VALID_BMP, 0.5), "pixel data is broken"),
    "bmp_bit_count_7.bmp": (lambda: VALID_BMP[:28] + struct.pack("<H", 7) + VALID_BMP[30:], "header is broken"),
    "bmp_100000x100000.bmp": (lambda: VALID_BMP[:18] + struct.pack("<ii", 100000, 100000) + VALID_BMP[26:],
                              "100000 x 100000"),
    "tiff_truncated.tif": (lambda: cut(VALID_TIFF, 0.5), "is broken"),
    "tiff_ifd_past_the_end.tif": (lambda: VALID_TIFF[:4] + struct.pack("<I", 1 << 30) + VALID_TIFF[8:], "is broken"),
    "tiff_float_rgb.tif": (lambda: tiff(RNG.random((4, 4, 3), dtype=np.float32), photometric="rgb"),
                           "unknown pixel mode"),
    "webp_riff_header_only.webp": (lambda: VALID_WEBP[:16], "is broken"),
    "webp_truncated.webp": (lambda: cut(VALID_WEBP, 0.5), "is broken"),
    "ppm_negative_size.ppm": (lambda: b"P6 -1 5 255\n" + b"\0" * 15, "header is broken"),
    "ppm_truncated.ppm": (lambda: b"P6 4 4 255\n" + b"\0" * 10, "pixel data is broken"),
}


@pytest.fixture(params=[LoadImage, LoadMask], ids=["LoadImage", "LoadMask"])
def load(request: pytest.FixtureRequest, ctx: RunContext) -> Callable[[str], object]:
    node = request.param()
    return lambda path: node.run(ctx, path=path) if isinstance(node, LoadImage) else \
        node.run(ctx, path=path, channel="luminance")


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_image_fails_with_an_error_naming_the_file_and_the_problem(
        load: Callable[[str], object], input_dir: Path, name: str) -> None:
    build, problem = MALFORMED[name]
    (input_dir / name).write_bytes(build())

    with pytest.raises(NodeInputError) as raised:
        load(name)

    assert str(raised.value).startswith(f"{name}: ") and problem in str(raised.value)


def test_an_interlaced_png_with_all_its_rows_loads_exactly(ctx: RunContext, input_dir: Path) -> None:
    (input_dir / "adam7.png").write_bytes(interlaced_grey(GREY_5X3))

    image = LoadImage().run(ctx, path="adam7.png")["image"][0].numpy()

    np.testing.assert_array_equal(image, np.repeat(GREY_5X3[..., None], 3, axis=-1).astype(np.float32) / 255)


def test_a_directory_is_refused_as_a_missing_file(load: Callable[[str], object], input_dir: Path) -> None:
    (input_dir / "folder.png").mkdir()

    with pytest.raises(PathError) as raised:
        load("folder.png")

    assert raised.value.error.code == Code.FILE_NOT_FOUND and raised.value.error.found == "folder.png"


def test_the_pixel_limit_is_checked_before_anything_is_decoded(
        ctx: RunContext, input_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (input_dir / "big.png").write_bytes(encoded(sample(size=(64, 48)), "PNG"))
    decoded: list[str] = []
    original = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.format) or original(self))
    ctx.options = {"max_image_pixels": 64 * 48 - 1}

    with pytest.raises(NodeInputError, match=r"big\.png: it is 64 x 48 = 3,072 pixels, more than the limit of "
                                             r"3,071 pixels.*--max-image-pixels 3072"):
        LoadImage().run(ctx, path="big.png")
    assert decoded == []

    ctx.options = {"max_image_pixels": 64 * 48}
    assert LoadImage().run(ctx, path="big.png")["image"].shape == (1, 48, 64, 3)


def test_a_raised_limit_lets_a_big_image_past_pillows_own_limit_without_touching_it(
        ctx: RunContext, input_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # as if Pillow's process-wide limit were tiny
    (input_dir / "a.png").write_bytes(encoded(sample(size=(16, 12)), "PNG"))
    ctx.options = {"max_image_pixels": 16 * 12}

    assert LoadImage().run(ctx, path="a.png")["image"].shape == (1, 12, 16, 3)
    assert Image.MAX_IMAGE_PIXELS == 100


@pytest.mark.parametrize("limit, action", [(100, "error"), (50, "default")], ids=["warning-as-error", "error"])
def test_pillows_decompression_bomb_checks_become_the_same_clear_error(
        ctx: RunContext, input_dir: Path, monkeypatch: pytest.MonkeyPatch, limit: int, action: str) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)  # 192 pixels: over the warning (limit) or error (2 limit)
    (input_dir / "a.tif").write_bytes(encoded(sample(size=(16, 12)), "TIFF"))  # TIFF checks again while decoding
    ctx.options = {"max_image_pixels": 16 * 12}

    with warnings.catch_warnings():
        warnings.simplefilter(action)
        with pytest.raises(NodeInputError, match=r"a\.tif: Image size \(192 pixels\) exceeds limit of \d+ pixels.*"
                                                 r"Pillow's own limit, PIL\.Image\.MAX_IMAGE_PIXELS"):
            LoadImage().run(ctx, path="a.tif")


@pytest.mark.parametrize("name, data", [
    ("garbage_exif.png", png_with(chunk(b"eXIf", b"MM\0*garbage"))),
    ("garbage_exif.jpg", VALID_JPEG[:2] + b"\xff\xe1\0\x14Exif\0\0MM\0*garbag" + VALID_JPEG[2:]),
])
def test_an_exif_block_pillow_cannot_parse_has_no_orientation_and_the_image_loads_as_stored(
        ctx: RunContext, input_dir: Path, name: str, data: bytes) -> None:
    (input_dir / name).write_bytes(data)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns "Corrupt EXIF data"
        image = LoadImage().run(ctx, path=name)["image"]

    with Image.open(io.BytesIO(data)) as stored:
        np.testing.assert_array_equal(image[0].numpy(), np.asarray(stored.convert("RGB"), np.float32) / 255)


@pytest.mark.parametrize("value", [0, -5, 1.5, "many", True])
def test_an_unusable_pixel_limit_option_is_refused(ctx: RunContext, input_dir: Path, value: object) -> None:
    (input_dir / "a.png").write_bytes(VALID_PNG)
    ctx.options = {"max_image_pixels": value}

    with pytest.raises(NodeInputError, match=r"max_image_pixels must be a positive whole number; found"):
        LoadImage().run(ctx, path="a.png")


FUZZ_SEEDS = {"png": VALID_PNG, "jpeg": VALID_JPEG, "gif": VALID_GIF, "bmp": VALID_BMP, "tiff": VALID_TIFF,
              "webp": VALID_WEBP, "exif_png": png_with(chunk(b"eXIf", exif_orientation(b"\0\x06")))}


def mutations(data: bytes, seed: int, count: int) -> list[bytes]:
    """`count` variants of `data`: a few bytes overwritten, a slice cut out or duplicated, or a truncation."""
    rng = np.random.default_rng(seed)
    variants = []
    for _ in range(count):
        kind, at = rng.integers(4), int(rng.integers(len(data)))
        if kind == 0:
            mutated = bytearray(data)
            for offset in rng.integers(len(data), size=int(rng.integers(1, 5))):
                mutated[offset] = int(rng.integers(256))
            variants.append(bytes(mutated))
        elif kind == 1:
            variants.append(data[:at] + data[at + int(rng.integers(1, 32)):])
        elif kind == 2:
            variants.append(data[:at] + data[at:at + int(rng.integers(1, 32))] + data[at:])
        else:
            variants.append(data[:at])
    return variants


@pytest.mark.parametrize("format", FUZZ_SEEDS)
def test_mutated_images_load_in_range_or_fail_with_a_node_input_error(ctx: RunContext, input_dir: Path,
                                                                      format: str) -> None:
    outcomes = {"loaded": 0, "refused": 0}
    for index, data in enumerate(mutations(FUZZ_SEEDS[format], seed=len(format), count=60)):
        name = f"{format}_{index}.img"
        (input_dir / name).write_bytes(data)
        try:
            out = LoadImage().run(ctx, path=name)
        except NodeInputError as error:
            assert str(error).startswith(f"{name}: "), error
            outcomes["refused"] += 1
            continue
        image, mask = out["image"], out["mask"]
        assert image.ndim == 4 and image.shape[-1] == 3 and mask.shape == image.shape[:3]
        assert 0 <= image.min() <= image.max() <= 1 and 0 <= mask.min() <= mask.max() <= 1
        outcomes["loaded"] += 1
    assert outcomes["refused"] > 0


def test_the_pixel_limit_decides_whether_loading_fails_never_the_cache_key(input_dir: Path) -> None:
    (input_dir / "a.png").write_bytes(VALID_PNG)
    graph = Graph("load")
    graph.output("image", graph.add(LoadImage(path="a.png"), "photo").image)
    engine = Engine(input_dirs=[input_dir], output_dir=input_dir / "out")

    with pytest.raises(NodeExecutionError, match=r"a\.png: it is 16 x 12 = 192 pixels, more than the limit of 191"):
        engine.run(graph, options={"max_image_pixels": 191})
    first = engine.run(graph, options={"max_image_pixels": 192})
    again = engine.run(graph, options={"max_image_pixels": 10**9})

    assert first.ran == ["photo"] and again.ran == [] and again.cached == ["photo"]


def test_threads_with_different_pixel_limits_do_not_see_each_others(input_dir: Path) -> None:
    (input_dir / "a.png").write_bytes(VALID_PNG)
    outcomes: dict[int, list[str]] = {limit: [] for limit in (191, 192)}

    def load_with(limit: int) -> None:
        ctx = RunContext("n", "LoadImage", PathPolicy.create([input_dir], input_dir / "out"), CancelToken(),
                         options={"max_image_pixels": limit})
        for _ in range(40):
            try:
                LoadImage().run(ctx, path="a.png")
                outcomes[limit].append("loaded")
            except NodeInputError:
                outcomes[limit].append("refused")

    threads = [threading.Thread(target=load_with, args=(limit,)) for limit in (191, 192, 191, 192)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert outcomes == {191: ["refused"] * 80, 192: ["loaded"] * 80}
