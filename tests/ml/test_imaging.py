"""Unit tests for ml.imaging: every image is generated in memory with Pillow and numpy."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, features

from ml import imaging
from ml.imaging import (
    ACCEPTED_FORMATS,
    DEFAULT_MAX_PIXELS,
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
    load_image_file,
    sniff_format,
    to_model_input,
)

HAS_WEBP = features.check("webp")
EXIF_ORIENTATION = 0x0112


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    """Return ``image`` saved in ``fmt`` as bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def gradient(width: int = 64, height: int = 48) -> npt.NDArray[np.uint8]:
    """A smooth horizontal 0..255 ramp (JPEG-friendly)."""
    row = np.linspace(0, 255, width).round().astype(np.uint8)
    return np.repeat(row[np.newaxis, :], height, axis=0)


def noise(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """Incompressible RGB noise, so that cutting the file in half loses pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_declaring_size(width: int, height: int) -> bytes:
    """A valid 1x1 L PNG whose IHDR is rewritten to claim ``width`` x ``height``.

    Image.open reads only the header, so this stands in for a decompression bomb without
    allocating anything big.
    """
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    # Signature (8) + chunk length (4) + b"IHDR" (4), then width and height, then the CRC.
    ihdr_start = 8 + 4
    struct.pack_into(">II", data, ihdr_start + 4, width, height)
    crc = zlib.crc32(bytes(data[ihdr_start : ihdr_start + 4 + 13]))
    struct.pack_into(">I", data, ihdr_start + 4 + 13, crc)
    return bytes(data)


def check_array(result: npt.NDArray[np.uint8], shape: tuple[int, int]) -> None:
    """Assert the decode_image output contract."""
    assert result.shape == shape
    assert result.dtype == np.uint8
    assert result.flags.c_contiguous
    assert result.flags.writeable


# --- accepted images -----------------------------------------------------------------------


def test_grayscale_png_is_returned_exactly() -> None:
    pixels = gradient()
    result = decode_image(encode(Image.fromarray(pixels), "PNG"))
    check_array(result, pixels.shape)
    np.testing.assert_array_equal(result, pixels)


def test_16bit_png_stretches_its_own_range_to_0_255() -> None:
    # 12-bit data as written by many X-ray systems: only 0..4095 of the 16 bits are used.
    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    result = decode_image(data)
    check_array(result, (64, 64))
    assert result.min() == 0
    assert result.max() == 255
    assert result[0, 0] == 0 and result[-1, -1] == 255
    expected = np.rint(ramp.astype(np.float64) * 255 / 4095).astype(np.uint8)
    np.testing.assert_array_equal(result, expected)


def test_16bit_png_with_offset_range() -> None:
    values = np.array([[1000, 1500], [2000, 3000]], dtype=np.uint16)
    result = decode_image(encode(Image.fromarray(values), "PNG"))
    np.testing.assert_array_equal(result, [[0, 64], [128, 255]])


def test_constant_16bit_png_maps_to_zero() -> None:
    data = encode(Image.fromarray(np.full((8, 8), 777, dtype=np.uint16)), "PNG")
    np.testing.assert_array_equal(decode_image(data), np.zeros((8, 8), dtype=np.uint8))


def test_rgb_png_uses_itu_601_luma() -> None:
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[1, :] = (200, 200, 200)
    result = decode_image(encode(Image.fromarray(rgb), "PNG"))
    check_array(result, (2, 3))
    # L = R * 299/1000 + G * 587/1000 + B * 114/1000
    np.testing.assert_allclose(result[0], [76, 150, 29], atol=1)
    np.testing.assert_array_equal(result[1], [200, 200, 200])


def test_rgba_png_composites_over_black() -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[:, 0] = (255, 255, 255, 255)  # opaque white
    rgba[:, 1] = (255, 255, 255, 0)  # fully transparent white
    rgba[:, 2] = (200, 200, 200, 128)  # half-transparent light grey
    result = decode_image(encode(Image.fromarray(rgba), "PNG"))
    check_array(result, (2, 3))
    np.testing.assert_array_equal(result[:, 0], [255, 255])
    np.testing.assert_array_equal(result[:, 1], [0, 0])
    np.testing.assert_allclose(result[:, 2], [100, 100], atol=1)


def test_la_png_composites_over_black() -> None:
    image = Image.merge("LA", (Image.new("L", (4, 1), 180), Image.new("L", (4, 1), 0)))
    image.putpixel((0, 0), (180, 255))
    result = decode_image(encode(image, "PNG"))
    np.testing.assert_array_equal(result, [[180, 0, 0, 0]])


def test_rgb_png_with_transparent_colour_key() -> None:
    image = Image.new("RGB", (2, 1), (255, 255, 255))
    image.putpixel((1, 0), (10, 20, 30))
    result = decode_image(encode(image, "PNG", transparency=(10, 20, 30)))
    np.testing.assert_array_equal(result, [[255, 0]])


def test_palette_png() -> None:
    image = Image.new("P", (3, 1))
    image.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0])
    image.putdata([0, 1, 2])
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    result = decode_image(data)
    check_array(result, (1, 3))
    np.testing.assert_allclose(result, [[0, 255, 76]], atol=1)


def test_palette_png_with_transparent_index_becomes_black() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 255, 255, 128, 128, 128])
    image.putdata([0, 1])
    result = decode_image(encode(image, "PNG", transparency=0))
    np.testing.assert_array_equal(result, [[0, 128]])


def test_1bit_png() -> None:
    image = Image.new("1", (4, 2), 0)
    image.putpixel((1, 0), 1)
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "1"
    result = decode_image(data)
    check_array(result, (2, 4))
    assert set(np.unique(result).tolist()) == {0, 255}
    assert result[0, 1] == 255 and result[0, 0] == 0


def test_grayscale_jpeg() -> None:
    pixels = gradient()
    result = decode_image(encode(Image.fromarray(pixels), "JPEG", quality=95))
    check_array(result, pixels.shape)
    assert np.abs(result.astype(int) - pixels.astype(int)).max() <= 4


def test_rgb_jpeg() -> None:
    result = decode_image(encode(Image.new("RGB", (16, 8), (255, 0, 0)), "JPEG", quality=95))
    check_array(result, (8, 16))
    assert np.abs(result.astype(int) - 76).max() <= 3


def test_cmyk_jpeg() -> None:
    image = Image.new("CMYK", (16, 8), (0, 0, 0, 0))  # no ink: white
    image.paste((0, 0, 0, 255), (8, 0, 16, 8))  # full black ink on the right half
    data = encode(image, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    result = decode_image(data)
    check_array(result, (8, 16))
    assert result[:, :4].min() >= 250
    assert result[:, 12:].max() <= 5


@pytest.mark.parametrize(
    ("orientation", "bright_corner"),
    [
        # 6: rotate 90 degrees clockwise to display -> stored top-left ends up top-right.
        (6, (0, -1)),
        # 8: rotate 90 degrees anticlockwise -> stored top-left ends up bottom-left.
        (8, (-1, 0)),
    ],
)
def test_exif_orientation_is_applied(orientation: int, bright_corner: tuple[int, int]) -> None:
    stored = np.zeros((24, 40), dtype=np.uint8)  # 40 wide, 24 high as stored
    stored[:8, :8] = 255  # bright block in the stored top-left corner
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif)
    result = decode_image(data)
    check_array(result, (40, 24))  # transposed: upright it is 24 wide, 40 high
    row, col = bright_corner
    assert result[row, col] > 200
    assert result[0, 0] < 50  # the stored top-left is no longer top-left


def test_mpo_uses_first_picture() -> None:
    first = Image.new("RGB", (16, 8), (255, 255, 255))
    second = Image.new("RGB", (16, 8), (0, 0, 0))
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert sniff_format(data) == "JPEG"
    result = decode_image(data)
    check_array(result, (8, 16))
    assert result.min() >= 250


def test_malformed_mpo_decodes_as_plain_jpeg_without_warning() -> None:
    first = Image.new("RGB", (16, 8), (255, 255, 255))
    data = encode(first, "MPO", save_all=True, append_images=[Image.new("RGB", (16, 8))])
    # Break the TIFF header of the MP index: Pillow warns and falls back to the base JPEG.
    marker = data.index(b"MPF\x00") + 4
    broken = data[:marker] + b"\xb6" + data[marker + 1 :]
    with pytest.warns(UserWarning, match="malformed MPO"):
        Image.open(io.BytesIO(broken))
    result = decode_image(broken)  # filterwarnings=error: a leaked warning would raise
    check_array(result, (8, 16))
    assert result.min() >= 250


def test_load_image_file(tmp_path: Path) -> None:
    pixels = gradient()
    path = tmp_path / "scan.png"
    path.write_bytes(encode(Image.fromarray(pixels), "PNG"))
    np.testing.assert_array_equal(load_image_file(path), pixels)
    np.testing.assert_array_equal(load_image_file(str(path)), pixels)


def test_result_is_a_fresh_array() -> None:
    data = encode(Image.fromarray(gradient()), "PNG")
    first = decode_image(data)
    first[:] = 7
    second = decode_image(data)
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(second, gradient())


@pytest.mark.parametrize("mode", ["I", "F"])
def test_wide_integer_and_float_images_are_stretched(mode: str) -> None:
    # PNG/JPEG never decode to these modes, so exercise the conversion on a Pillow image.
    values = np.array([[-5.0, 0.0], [5.0, 15.0]])
    image = Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32))
    assert image.mode == mode
    result = imaging._to_grayscale(image)
    np.testing.assert_array_equal(result, [[0, 64], [128, 255]])


def test_non_finite_float_pixels_become_zero() -> None:
    values = np.array([[np.nan, 1.0], [np.inf, 3.0]], dtype=np.float32)
    np.testing.assert_array_equal(imaging.stretch_to_uint8(values), [[0, 0], [0, 255]])


# --- refused uploads -------------------------------------------------------------------------


def _cut_in_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _animated_gif() -> bytes:
    frames = [Image.new("L", (8, 8), value) for value in (0, 255)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _apng() -> bytes:
    frames = [Image.new("L", (8, 8), value) for value in (0, 255)]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    return data


REFUSED: list[Any] = [
    pytest.param(b"", EmptyImageError, "empty", id="empty"),
    pytest.param(b"hello", CorruptImageError, "corrupt", id="text-named-png"),
    pytest.param(
        np.random.default_rng(0).bytes(4096), CorruptImageError, "corrupt", id="random-bytes"
    ),
    pytest.param(
        _cut_in_half(encode(noise(), "JPEG", quality=95)),
        CorruptImageError,
        "corrupt",
        id="truncated-jpeg",
    ),
    pytest.param(
        _cut_in_half(encode(noise(), "PNG")), CorruptImageError, "corrupt", id="truncated-png"
    ),
    pytest.param(encode(noise(), "PNG")[:20], CorruptImageError, "corrupt", id="png-header-only"),
    pytest.param(
        encode(Image.new("P", (8, 8)), "GIF"), UnsupportedImageError, "unsupported_format", id="gif"
    ),
    pytest.param(_animated_gif(), UnsupportedImageError, "unsupported_format", id="animated-gif"),
    pytest.param(_apng(), UnsupportedImageError, "unsupported_format", id="apng"),
    pytest.param(encode(noise(8, 8), "BMP"), UnsupportedImageError, "unsupported_format", id="bmp"),
    pytest.param(
        encode(noise(8, 8), "TIFF"), UnsupportedImageError, "unsupported_format", id="tiff"
    ),
    pytest.param(
        encode(noise(16, 16), "ICO"), UnsupportedImageError, "unsupported_format", id="ico"
    ),
    pytest.param(encode(noise(8, 8), "PPM"), UnsupportedImageError, "unsupported_format", id="ppm"),
]
if HAS_WEBP:
    REFUSED.append(
        pytest.param(
            encode(noise(8, 8), "WEBP"), UnsupportedImageError, "unsupported_format", id="webp"
        )
    )


@pytest.mark.parametrize(("data", "error", "code"), REFUSED)
def test_refused_uploads(data: bytes, error: type[ImageError], code: str) -> None:
    with pytest.raises(error) as caught:
        decode_image(data)
    assert type(caught.value) is error
    assert caught.value.code == code
    assert isinstance(caught.value, ValueError)
    assert str(caught.value)


def test_unsupported_format_message_names_format_and_accepted_ones() -> None:
    with pytest.raises(UnsupportedImageError, match="BMP") as caught:
        decode_image(encode(noise(8, 8), "BMP"))
    assert "PNG" in str(caught.value) and "JPEG" in str(caught.value)


def test_animated_png_message_says_animated() -> None:
    with pytest.raises(UnsupportedImageError, match="animated"):
        decode_image(_apng())


def test_not_an_image_message() -> None:
    with pytest.raises(CorruptImageError, match="not a PNG or JPEG image"):
        decode_image(b"hello")


def test_image_over_max_pixels_is_refused_from_the_header() -> None:
    data = png_declaring_size(5000, 5000)
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as caught:
        decode_image(data, max_pixels=1_000_000)
    assert time.perf_counter() - started < 0.5
    assert caught.value.code == "too_many_pixels"
    assert "25,000,000" in str(caught.value) and "1,000,000" in str(caught.value)


@pytest.mark.parametrize(
    "side",
    [
        8_000,  # 64 MP: above our default limit, below Pillow's own warning threshold
        10_000,  # 100 MP: Pillow would emit DecompressionBombWarning
        20_000,  # 400 MP: Pillow raises DecompressionBombError inside Image.open
    ],
)
def test_decompression_bomb_with_default_limit(side: int) -> None:
    assert side * side > DEFAULT_MAX_PIXELS
    data = png_declaring_size(side, side)
    assert len(data) < 100
    started = time.perf_counter()
    # pytest turns warnings into errors, so a leaked DecompressionBombWarning would fail here.
    with pytest.raises(ImageTooLargeError):
        decode_image(data)
    assert time.perf_counter() - started < 0.5


def test_max_pixels_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(encode(Image.new("L", (1, 1)), "PNG"), max_pixels=0)


def test_error_hierarchy() -> None:
    assert ImageError.code == "invalid_image"
    for error in (EmptyImageError, CorruptImageError, UnsupportedImageError, ImageTooLargeError):
        assert issubclass(error, ImageError)
        assert issubclass(error, ValueError)
    assert str(CorruptImageError("why")) == "why"


# --- sniff_format ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (encode(Image.new("L", (4, 4)), "PNG"), "PNG"),
        (encode(Image.new("L", (4, 4)), "JPEG"), "JPEG"),
        (encode(Image.new("P", (4, 4)), "GIF"), "GIF"),
        (encode(Image.new("RGB", (4, 4)), "BMP"), "BMP"),
        (encode(Image.new("RGB", (4, 4)), "TIFF"), "TIFF"),
        (png_declaring_size(20_000, 20_000), "PNG"),
        (b"", None),
        (b"hello", None),
        (np.random.default_rng(1).bytes(512), None),
    ],
)
def test_sniff_format(data: bytes, expected: str | None) -> None:
    assert sniff_format(data) == expected


def test_accepted_formats() -> None:
    assert frozenset({"PNG", "JPEG"}) == ACCEPTED_FORMATS


# --- to_model_input --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 64), (64, 48), (300, 200), (10, 10), (1, 1)])
@pytest.mark.parametrize("size", [32, 224])
def test_to_model_input_shape_and_dtype(shape: tuple[int, int], size: int) -> None:
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, shape, dtype=np.uint8)
    before = gray.copy()
    result = to_model_input(gray, size)
    assert result.shape == (size, size, 1)
    assert result.dtype == np.float32
    assert result.flags.c_contiguous and result.flags.writeable
    assert result.min() >= 0.0 and result.max() <= 255.0
    np.testing.assert_array_equal(gray, before)
    assert not np.shares_memory(result, gray)


def test_to_model_input_preserves_full_range() -> None:
    gray = np.zeros((100, 100), dtype=np.uint8)
    gray[:, 50:] = 255
    result = to_model_input(gray, 20)
    assert result.min() == 0.0
    assert result.max() == 255.0
    # A squashed step edge stays a step: left half dark, right half bright.
    assert result[:, :9].max() == 0.0 and result[:, 11:].min() == 255.0


def test_to_model_input_constant_and_identity() -> None:
    np.testing.assert_array_equal(
        to_model_input(np.full((30, 70), 123, dtype=np.uint8), 16), np.full((16, 16, 1), 123.0)
    )
    gray = gradient(16, 16)
    np.testing.assert_array_equal(to_model_input(gray, 16)[:, :, 0], gray.astype(np.float32))


def test_to_model_input_accepts_non_contiguous_view() -> None:
    gray = gradient(64, 64)[:, ::2]
    assert not gray.flags.c_contiguous
    assert to_model_input(gray, 8).shape == (8, 8, 1)


def test_to_model_input_does_not_write_through_readonly_input() -> None:
    gray = gradient()
    gray.flags.writeable = False
    assert to_model_input(gray, 8).shape == (8, 8, 1)


@pytest.mark.parametrize(
    ("gray", "size"),
    [
        (np.zeros((4, 4, 1), dtype=np.uint8), 8),
        (np.zeros((4, 4), dtype=np.float32), 8),
        (np.zeros((0, 4), dtype=np.uint8), 8),
        (np.zeros((4, 4), dtype=np.uint8), 0),
        (np.zeros((4, 4), dtype=np.uint8), True),
    ],
)
def test_to_model_input_rejects_bad_arguments(gray: npt.NDArray[Any], size: int) -> None:
    with pytest.raises(ValueError):
        to_model_input(gray, size)


def test_decoded_upload_feeds_model_input() -> None:
    data = encode(Image.fromarray(np.arange(4096, dtype=np.uint16).reshape(32, 128)), "PNG")
    result = to_model_input(decode_image(data), 64)
    assert result.shape == (64, 64, 1)
    assert result.min() == 0.0 and result.max() == 255.0


def png_chunk_types(data: bytes) -> list[bytes]:
    """The chunk types of a PNG file, in order, checking each chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    kinds, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        kinds.append(kind)
        pos += 12 + length
    return kinds


@pytest.mark.parametrize(
    "pixels",
    [
        pytest.param(np.random.default_rng(0).integers(0, 256, (37, 53), np.uint8), id="noise"),
        pytest.param(gradient(256, 256), id="gradient"),
        pytest.param(np.full((1, 1), 255, np.uint8), id="1x1"),
        pytest.param(np.arange(256, dtype=np.uint8)[np.newaxis, :], id="one-row"),
        pytest.param(np.arange(256, dtype=np.uint8)[:, np.newaxis], id="one-column"),
        pytest.param(gradient(90, 40)[::2, ::3], id="non-contiguous-view"),
    ],
)
def test_encode_png_is_lossless_and_pixels_only(pixels: npt.NDArray[np.uint8]) -> None:
    data = imaging.encode_png(pixels)
    assert png_chunk_types(data) == [b"IHDR", b"IDAT", b"IEND"]
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.mode == "L" and image.info == {}
        assert np.array_equal(np.asarray(image), pixels)
    assert np.array_equal(decode_image(data), pixels)


def test_encode_png_of_a_real_size_xray_is_smaller_than_the_raw_pixels() -> None:
    from tests.realsize import xray_pixels

    pixels = (np.clip(xray_pixels(1024, 832, 0.02), 0, 1) * 255).astype(np.uint8)
    data = imaging.encode_png(pixels)
    assert len(data) < 0.75 * pixels.size
    assert np.array_equal(decode_image(data), pixels)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4), np.uint16), np.zeros((4, 4, 3), np.uint8), np.zeros((0, 4), np.uint8)],
    ids=["uint16", "rgb", "empty"],
)
def test_encode_png_rejects_what_is_not_8_bit_grayscale(bad: npt.NDArray[Any]) -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        imaging.encode_png(bad)
