"""Image intake: uploaded bytes -> a validated 8-bit grayscale numpy array of bounded size.

Only Pillow, numpy, pydicom (through :mod:`ml.dicom`) and the standard library are used here,
because the web process imports this module to validate uploads and must never pull in TensorFlow.

:func:`decode_image` accepts PNG and JPEG (including multi-picture "MPO" JPEGs from cameras, of
which the first picture is used) and DICOM projection X-rays (CR/DX, recognised by their content
under any file name; see :mod:`ml.dicom`), and refuses everything else with an :class:`ImageError`
subclass whose ``code`` is a short machine string and whose ``str()`` says why in plain words.
:func:`decode_image` also bounds the result's longer side to :data:`INTAKE_MAX_SIDE`, so what
every later step holds and computes (Redis, the worker's decode, a reading view) does not grow with
the file; :func:`encode_png` turns that array into the metadata-free PNG the web stores.
:func:`to_model_input` is the resize to the model's input used by both training and serving.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import types
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "CorruptImageError",
    "EmptyImageError",
    "ImageError",
    "ImageTooLargeError",
    "UnsupportedImageError",
    "UnsupportedModalityError",
    "INTAKE_MAX_SIDE",
    "bound_size",
    "DecodedImage",
    "decode_image",
    "decode_upload",
    "encode_png",
    "load_image_file",
    "sniff_format",
    "stretch_to_uint8",
    "to_model_input",
]

ACCEPTED_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG"})
"""Pillow format names that :func:`decode_image` accepts ("MPO" counts as "JPEG")."""

DEFAULT_MAX_PIXELS = 60_000_000
"""Largest width * height decoded by default (a 16-bit 60 MP image is already 120 MB of pixels)."""

INTAKE_MAX_SIDE = 1024
"""Longest side, in pixels, of every decoded image (larger ones are scaled down, aspect kept).

Four times the model's 224 px and enough for a reading view on a screen; a full-size 3000 px
X-ray is ~9 MP, which would cost every later step ~9x the memory and time for no gain in the
model's answer.
"""

# Pillow reports multi-picture JPEGs (stereo / depth photos from phones and cameras) as "MPO";
# the first picture is an ordinary JPEG, so they are treated as JPEG.
_FORMAT_ALIASES = {"MPO": "JPEG"}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"

# What Pillow raises on damaged or truncated data (its own fuzzers treat these as "clean"
# failures); anything else is a bug and should not be disguised as a bad upload.
_PILLOW_DATA_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
)

# Modes that carry more than 8 bits per sample and are stretched min..max to 0..255.
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
# 8-bit modes that Pillow's convert("L") turns into luma (ITU-R 601-2 for RGB).
_DIRECT_TO_L_MODES = frozenset({"L", "1", "RGB", "CMYK", "YCbCr"})


class ImageError(ValueError):
    """An upload that cannot be used as an X-ray.

    ``code`` is a short machine-readable string; ``str(error)`` is a human message saying why.
    """

    code: str = "invalid_image"


class EmptyImageError(ImageError):
    """The upload has zero bytes."""

    code = "empty"


class CorruptImageError(ImageError):
    """Not an image at all, or image data that is truncated or cannot be decoded."""

    code = "corrupt"


class UnsupportedImageError(ImageError):
    """A real image that is not a still PNG/JPEG/DICOM, or whose pixel mode is not supported.

    Also a DICOM file without pixel data or in a transfer syntax that is not supported.
    """

    code = "unsupported_format"


class UnsupportedModalityError(UnsupportedImageError):
    """A DICOM image that is not a projection X-ray (e.g. a CT or MR slice)."""

    code = "unsupported_modality"


class ImageTooLargeError(ImageError):
    """The image declares more pixels than allowed (a possible decompression bomb)."""

    code = "too_many_pixels"


def _normalise_format(fmt: str | None) -> str | None:
    """Return Pillow's format name with aliases (MPO -> JPEG) folded in."""
    if fmt is None:
        return None
    return _FORMAT_ALIASES.get(fmt, fmt)


def _format_from_signature(data: bytes) -> str | None:
    """Return "PNG" or "JPEG" from the magic bytes alone, else None."""
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data.startswith(_JPEG_SIGNATURE):
        return "JPEG"
    return None


def sniff_format(data: bytes) -> str | None:
    """Return the image format of ``data`` without decoding its pixels.

    The result is a Pillow format name ("PNG", "JPEG", "GIF", "BMP", ...; multi-picture "MPO"
    is reported as "JPEG"), or None when the data is not a recognisable image. Only the header
    is read, so this is cheap even for huge images.
    """
    if not data:
        return None
    with _pillow_data_warnings_silenced():
        try:
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format
        except Image.DecompressionBombError:
            # Pillow refuses very large images inside Image.open without telling the format,
            # so fall back to the magic bytes.
            return _format_from_signature(data)
        except _PILLOW_DATA_ERRORS:
            return None
    return _normalise_format(fmt)


@dataclass(frozen=True)
class DecodedImage:
    """An upload after :func:`decode_upload`: its bounded grayscale pixels and what it was."""

    pixels: npt.NDArray[np.uint8]
    """2-D uint8 grayscale, longer side at most the ``max_side`` it was decoded with."""
    width: int
    """Width of the image as uploaded (after the EXIF orientation), before any bound."""
    height: int
    """Height of the image as uploaded, before any bound."""
    format: str
    """"PNG", "JPEG" or "DICOM"."""


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = INTAKE_MAX_SIDE,
) -> npt.NDArray[np.uint8]:
    """Return :func:`decode_upload`'s pixels: the image in ``data``, bounded, in grayscale."""
    return decode_upload(data, max_pixels=max_pixels, max_side=max_side).pixels


def decode_upload(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = INTAKE_MAX_SIDE,
) -> DecodedImage:
    """Decode the still PNG/JPEG or DICOM image in ``data`` to 8-bit grayscale, bounded.

    DICOM is recognised by its content, not a file name: "DICM" after the 128-byte preamble, or a
    preamble-less dataset that pydicom can read and that holds pixel data; it is decoded by
    :func:`ml.dicom.decode_dicom` (first frame, modality and VOI LUT, MONOCHROME1 inverted) and
    bounded like any other image.

    The result is a fresh, writeable, C-contiguous 2-D uint8 array of shape (height, width),
    upright according to the EXIF orientation tag. Colour is reduced to luma, transparent
    pixels are composited over black, and 16-bit / 32-bit images are stretched linearly from
    their own minimum..maximum to 0..255 (a constant image becomes all 0). An image whose longer
    side exceeds ``max_side`` is then scaled down to it (:func:`bound_size`); ``None`` keeps the
    full resolution.

    Raises :class:`EmptyImageError`, :class:`CorruptImageError`, :class:`UnsupportedImageError`
    or :class:`ImageTooLargeError` (when width * height exceeds ``max_pixels``; checked from the
    header before any pixel is decoded). Pillow's own bomb limit (twice ``Image.MAX_IMAGE_PIXELS``)
    also applies, so a ``max_pixels`` above it cannot let larger images through.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if not data:
        raise EmptyImageError("the upload is empty (0 bytes)")
    if _dicom().looks_like_dicom(data):
        return _decode_dicom_upload(data, max_pixels, max_side, raw=False)

    with _pillow_data_warnings_silenced():
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(
                f"the image has too many pixels to decode safely ({exc}); "
                f"the limit is {max_pixels:,} pixels"
            ) from exc
        except _PILLOW_DATA_ERRORS as exc:
            if _dicom().may_be_raw_dataset(data):
                # A DICOM dataset written without preamble and magic: only pydicom can tell.
                try:
                    return _decode_dicom_upload(data, max_pixels, max_side, raw=True)
                except _dicom().NotDicomError:
                    pass
            raise CorruptImageError(_unreadable_message(data)) from exc

        with image:
            _check_header(image, max_pixels)
            try:
                image.load()
                ImageOps.exif_transpose(image, in_place=True)
            except Image.DecompressionBombError as exc:
                raise ImageTooLargeError(
                    f"the image has too many pixels to decode safely ({exc})"
                ) from exc
            except _PILLOW_DATA_ERRORS as exc:
                raise CorruptImageError(
                    f"the {_normalise_format(image.format)} image is truncated or damaged "
                    f"and cannot be decoded ({exc})"
                ) from exc
            fmt = _normalise_format(image.format) or "?"
            gray = _to_grayscale(image)
    height, width = gray.shape
    pixels = gray if max_side is None else bound_size(gray, max_side)
    return DecodedImage(pixels=pixels, width=int(width), height=int(height), format=fmt)


def _dicom() -> types.ModuleType:
    """Return :mod:`ml.dicom`, imported on first use.

    It imports this module (for the error classes and the stretch), so a top-level import would
    be circular; and pydicom with its plugins costs a few tenths of a second to import, which
    only processes that meet a DICOM pay.
    """
    import ml.dicom

    return ml.dicom


def _decode_dicom_upload(
    data: bytes, max_pixels: int, max_side: int | None, *, raw: bool
) -> DecodedImage:
    """:func:`decode_upload` for DICOM bytes."""
    decoded = _dicom().decode_dicom(data, max_pixels=max_pixels, raw=raw)
    pixels = decoded.pixels if max_side is None else bound_size(decoded.pixels, max_side)
    return DecodedImage(pixels=pixels, width=decoded.width, height=decoded.height, format="DICOM")


def load_image_file(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = INTAKE_MAX_SIDE,
) -> npt.NDArray[np.uint8]:
    """Read a file and return :func:`decode_image` of its bytes."""
    return decode_image(Path(path).read_bytes(), max_pixels=max_pixels, max_side=max_side)


def bound_size(gray: npt.NDArray[np.uint8], max_side: int) -> npt.NDArray[np.uint8]:
    """Scale a 2-D uint8 image down so that its longer side is at most ``max_side``.

    The aspect ratio is kept (each side rounded, at least 1 px) and Pillow's BILINEAR filter is
    used, antialiased when downscaling as in :func:`to_model_input`. An image that already fits
    is returned as it is (not copied).
    """
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    height, width = gray.shape
    longer = max(height, width)
    if longer <= max_side:
        return gray
    scale = max_side / longer
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(gray).resize(size, Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.uint8)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and the CRC-32 of type and data."""
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(gray: npt.NDArray[np.uint8]) -> bytes:
    """Encode a 2-D uint8 image as an 8-bit grayscale PNG that carries pixels only.

    Nothing of the upload's metadata (EXIF, comments, ICC profiles, text chunks) is carried over:
    the array has none, and the file has no chunk but IHDR, IDAT and IEND. Written here rather
    than by Pillow because this is most of the web's CPU per upload: Pillow tries four PNG
    filters on every row and has no option to pick one. Every row here uses filter 1 ("Sub",
    each byte minus its left neighbour: one numpy subtraction), deflated at zlib level 1 with the
    run-length strategy: the PNG lives minutes in Redis, not years on a disk. On the shared
    256 px X-rays that is 0.6 ms instead of Pillow's 1.9 ms at level 1, and 34 KiB instead of
    36 KiB; on 1024 px ones with film grain 9.6 ms instead of 33 ms, and 5 % smaller.
    """
    if gray.ndim != 2 or gray.dtype != np.uint8 or gray.size == 0:
        raise ValueError(
            f"expected a non-empty 2-D uint8 grayscale array, got shape {gray.shape} "
            f"dtype {gray.dtype}"
        )
    height, width = gray.shape
    rows = np.empty((height, width + 1), dtype=np.uint8)
    rows[:, 0] = 1  # the filter type byte that starts every row: Sub
    rows[:, 1] = gray[:, 0]
    np.subtract(gray[:, 1:], gray[:, :-1], out=rows[:, 2:])  # uint8: modulo 256, as PNG wants
    deflate = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL, zlib.Z_RLE)
    idat = deflate.compress(rows.data) + deflate.flush()
    # Width, height, bit depth 8, colour type 0 (grayscale), deflate, adaptive filters, no
    # interlace.
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            _png_chunk(b"IHDR", ihdr),
            _png_chunk(b"IDAT", idat),
            _png_chunk(b"IEND", b""),
        )
    )


def to_model_input(gray: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.float32]:
    """Resize a 2-D uint8 grayscale image to the model's square input.

    Returns a new float32 array of shape (size, size, 1) with values in 0..255. The image is
    squashed to a square (no crop or padding, like Keras ``image_dataset_from_directory``)
    with Pillow's BILINEAR filter, which is antialiased when downscaling. Training and serving
    both call it (after the same :func:`bound_size` of :func:`decode_image`), so they cannot
    disagree on the model's input. ``gray`` is not modified.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(
            f"expected a 2-D uint8 grayscale array, got shape {gray.shape} dtype {gray.dtype}"
        )
    if gray.shape[0] == 0 or gray.shape[1] == 0:
        raise ValueError(f"cannot resize an empty image of shape {gray.shape}")

    # fromarray may share the array's memory (read-only); resize always builds a new image,
    # so the caller's array is never written to.
    resized = Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, dtype=np.float32)
    return np.ascontiguousarray(pixels[:, :, np.newaxis])


@contextlib.contextmanager
def _pillow_data_warnings_silenced() -> Iterator[None]:
    """Silence Pillow's warnings about the uploaded data itself while the block runs.

    Our own max_pixels check replaces DecompressionBombWarning, and the UserWarnings Pillow
    issues for quirky files ("malformed MPO", "corrupt EXIF", "invalid APNG") describe the
    uploader's file, not our code: each upload either decodes or raises an ImageError. Left
    alone they would flood the logs, and under pytest's filterwarnings=error they would escape
    as exceptions that are not ImageErrors. Deprecation warnings are deliberately left visible.
    Note: like all ``warnings.catch_warnings`` use, this swaps the process-wide filter list.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


def _unreadable_message(data: bytes) -> str:
    """Explain why Image.open could not read ``data``."""
    signature_format = _format_from_signature(data)
    if signature_format is not None:
        return f"the data starts like a {signature_format} image but its header is damaged"
    return (
        "not a PNG or JPEG image (nor a DICOM file): the data is not in any image format that "
        "can be recognised"
    )


def _check_header(image: Image.Image, max_pixels: int) -> None:
    """Refuse formats, animations and sizes we do not accept, using only the header."""
    fmt = _normalise_format(image.format)
    if fmt not in ACCEPTED_FORMATS:
        raise UnsupportedImageError(
            f"{fmt} images are not accepted; please upload a PNG or JPEG image"
        )
    # MPO files also have several frames, but they are separate pictures, not an animation.
    n_frames: int = getattr(image, "n_frames", 1)
    if image.format != "MPO" and n_frames > 1:
        raise UnsupportedImageError(
            f"animated {fmt} images ({n_frames} frames) are not accepted; "
            "please upload a single still PNG or JPEG image"
        )
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"the image is {width}x{height} = {width * height:,} pixels, "
            f"above the limit of {max_pixels:,} pixels"
        )


def _to_grayscale(image: Image.Image) -> npt.NDArray[np.uint8]:
    """Convert a loaded Pillow image of any supported mode to a fresh 2-D uint8 array."""
    mode = image.mode
    if mode in _HIGH_DEPTH_MODES:
        return stretch_to_uint8(np.asarray(image))

    has_transparency = image.info.get("transparency") is not None
    if mode in ("P", "PA"):
        # Palette entries may carry alpha (PNG tRNS), so expand to RGBA only when they might.
        image = image.convert("RGBA" if mode == "PA" or has_transparency else "RGB")
    elif mode in ("L", "RGB") and has_transparency:
        # A PNG tRNS colour key marks one value as fully transparent: make it real alpha.
        image = image.convert("LA" if mode == "L" else "RGBA")

    if image.mode in ("RGBA", "LA"):
        gray = _composite_over_black(image)
    elif image.mode in _DIRECT_TO_L_MODES:
        gray = image.convert("L")
    else:
        raise UnsupportedImageError(
            f"images with pixel mode {mode!r} are not supported; "
            "please upload an ordinary grayscale or colour PNG or JPEG"
        )
    # np.array copies, so the result owns its (writeable, C-ordered) memory.
    return np.array(gray, dtype=np.uint8)


def _composite_over_black(image: Image.Image) -> Image.Image:
    """Return the L image of an RGBA/LA image composited over an opaque black background."""
    # Pasting through the alpha mask onto black scales each pixel by alpha / 255; working in L
    # keeps peak memory at three bytes per pixel instead of the eight of an RGBA composite.
    luma = image.convert("L")
    result = Image.new("L", image.size, 0)
    result.paste(luma, mask=image.getchannel("A"))
    return result


def stretch_to_uint8(values: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """Map ``values`` linearly from their own min..max onto 0..255 (constant input -> 0).

    Non-finite floats (NaN, infinities) are ignored for the range and become 0.
    """
    if values.dtype.kind == "u" and values.dtype.itemsize <= 2:
        # 16-bit: a 65536-entry lookup table avoids a float copy of the whole image.
        low, high = int(values.min()), int(values.max())
        if high == low:
            return np.zeros(values.shape, dtype=np.uint8)
        table = np.zeros(1 << (8 * values.dtype.itemsize), dtype=np.uint8)
        ramp = np.arange(high - low + 1, dtype=np.float64) * (255.0 / (high - low))
        table[low : high + 1] = np.rint(ramp).astype(np.uint8)
        return np.ascontiguousarray(table[values])

    floats = values.astype(np.float64)
    finite = np.isfinite(floats)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    low_f = float(floats[finite].min())
    high_f = float(floats[finite].max())
    if high_f == low_f:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = np.rint((floats - low_f) * (255.0 / (high_f - low_f)))
    scaled[~finite] = 0.0
    return np.ascontiguousarray(np.clip(scaled, 0.0, 255.0).astype(np.uint8))
