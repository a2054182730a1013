"""DICOM intake: the bytes of a DICOM file -> the 8-bit grayscale pixels of a projection X-ray.

Only pydicom (with its pixel-data plugins: Pillow, pylibjpeg + pylibjpeg-libjpeg), numpy and the
standard library are used, because the web process decodes uploads with this module and must
never pull in TensorFlow, Flask or Celery here.

:func:`looks_like_dicom` tells DICOM bytes apart from PNG/JPEG; :func:`decode_dicom` turns them
into a :class:`DicomPixels` or refuses them with an ``ml.imaging.ImageError`` subclass. Nothing but
the pixels and the image's size leaves this module: no tag of the file (patient, study, dates,
institution) is returned, logged or put into an error message.

The mapping to 8 bits, for monochrome images, in this order:

1. the first frame of a multi-frame object is used (the others are never decoded);
2. the Modality LUT (Rescale Slope / Intercept, or a Modality LUT Sequence) is applied;
3. with a VOI LUT Sequence, its table is applied and its lowest..highest entry maps to 0..255;
   else with a Window Center / Width (the first one when there are several), the window is applied
   and its output range maps to 0..255 (values outside the window are clipped);
4. without either, 8-bit unsigned stored values with no rescale are used as they are (like an
   8-bit PNG) and anything else is stretched from its own minimum..maximum to 0..255 (like a
   16-bit PNG; a constant image becomes all 0);
5. ``MONOCHROME1`` (0 = white) is inverted, so that in the result bright is always dense.

Colour images (RGB, YBR_* which pydicom converts to RGB, PALETTE COLOR through its palette) are
reduced to luma with the same integer ITU-R 601-2 weights as Pillow's ``convert("L")``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.config
import pydicom.uid as dicom_uid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_voi_lut,
    get_decoder,
)
from pydicom.pixels import pixel_array as dicom_pixel_array

from ml.imaging import (
    CorruptImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    UnsupportedModalityError,
    stretch_to_uint8,
)

__all__ = [
    "ACCEPTED_MODALITIES",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "DicomPixels",
    "NotDicomError",
    "decode_dicom",
    "looks_like_dicom",
    "may_be_raw_dataset",
]

ACCEPTED_MODALITIES: frozenset[str] = frozenset({"CR", "DX", "DR", "RG"})
"""Values of (0008,0060) Modality accepted as a projection X-ray.

CR (computed radiography) and DX (digital radiography) are what chest X-rays carry; "DR" is not a
DICOM code but some vendors write it for DX; RG is conventional (film/screen) radiography, e.g. a
digitised chest film. Everything else (CT, MR, US, NM, PT, XA, RF, MG, PX, IO, OT, SC, ...) is
refused. A file with no (or an empty) Modality is accepted: images wrapped as DICOM by conversion
scripts often lack it, and the pixels are still checked like any other image.
"""

SUPPORTED_TRANSFER_SYNTAXES: dict[str, str] = {
    dicom_uid.ImplicitVRLittleEndian: "Implicit VR Little Endian",
    dicom_uid.ExplicitVRLittleEndian: "Explicit VR Little Endian",
    dicom_uid.DeflatedExplicitVRLittleEndian: "Deflated Explicit VR Little Endian",
    dicom_uid.ExplicitVRBigEndian: "Explicit VR Big Endian (retired)",
    dicom_uid.RLELossless: "RLE Lossless",
    dicom_uid.JPEGBaseline8Bit: "JPEG Baseline (Process 1)",
    dicom_uid.JPEGExtended12Bit: "JPEG Extended (Process 2 & 4)",
    dicom_uid.JPEGLossless: "JPEG Lossless, Non-Hierarchical (Process 14)",
    dicom_uid.JPEGLosslessSV1: "JPEG Lossless, First-Order Prediction (Process 14, SV1)",
    dicom_uid.JPEGLSLossless: "JPEG-LS Lossless",
    dicom_uid.JPEGLSNearLossless: "JPEG-LS Lossy (Near-Lossless)",
    dicom_uid.JPEG2000Lossless: "JPEG 2000 (Lossless Only)",
    dicom_uid.JPEG2000: "JPEG 2000",
}
"""Transfer syntaxes whose pixel data is decoded (UID -> name); each one is covered by a test."""

_DICM_OFFSET = 128
_DICM_MAGIC = b"DICM"
# A DICOM dataset written without the 128-byte preamble and "DICM" (a "raw" dataset, as some
# older tools do) starts with a tag of group 0x0002 (file meta) or 0x0008 (identifying), little
# or big endian. Only data starting like that is handed to pydicom's forced read: random bytes
# would otherwise be parsed as an arbitrary (nonsense) dataset.
_RAW_DATASET_STARTS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")

# pydicom reports problems with a file's values through its "pydicom" logger as well as through
# warnings, and those messages may quote the values (a patient's name, a date). Kept out of the
# process's log handlers; the upload is refused or decoded either way. Value validation while
# reading is skipped too: only the pixel module's values are used, and those are checked here.
logging.getLogger("pydicom").propagate = False
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

_UNDEFINED_LENGTH = 0xFFFFFFFF
_SEQUENCE_DELIMITER_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0
_SEQUENCE_DELIMITER_BE = b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"
# JPEG frames go through Pillow first, as PNG/JPEG uploads do, so that a JPEG wrapped in a DICOM
# decodes to exactly the pixels of the same JPEG uploaded as a file (libjpeg's IDCT differs by
# +-1); other plugins are the fallback (e.g. 12-bit JPEG, which Pillow cannot decode).
_PREFERRED_PLUGIN = {dicom_uid.JPEGBaseline8Bit: "pillow", dicom_uid.JPEGExtended12Bit: "pillow"}
_LONGEST_ELEMENT_HEADER = 12  # explicit VR with a 4-byte length: tag 4, VR 2, reserved 2, length 4
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"})


@dataclass(frozen=True)
class DicomPixels:
    """The first frame of a DICOM image as 8-bit grayscale, at full resolution."""

    pixels: npt.NDArray[np.uint8]
    """2-D uint8 grayscale of shape (Rows, Columns); bright is dense whatever the file said."""
    width: int
    """(0028,0011) Columns."""
    height: int
    """(0028,0010) Rows."""


def looks_like_dicom(data: bytes) -> bool:
    """Tell whether ``data`` is a DICOM file: "DICM" after the 128-byte preamble.

    Preamble-less datasets are not recognised here (they have no magic); :func:`decode_dicom`
    with ``raw=True`` tries those.
    """
    return data[_DICM_OFFSET : _DICM_OFFSET + len(_DICM_MAGIC)] == _DICM_MAGIC


def may_be_raw_dataset(data: bytes) -> bool:
    """Tell whether ``data`` starts like a DICOM dataset written without preamble and magic."""
    return data[:2] in _RAW_DATASET_STARTS


def decode_dicom(data: bytes, *, max_pixels: int, raw: bool = False) -> DicomPixels:
    """Decode the DICOM file in ``data`` to the 8-bit grayscale pixels of its first frame.

    ``raw=True`` reads a dataset without preamble and "DICM" (pydicom's forced read) and raises
    :class:`NotDicomError` when that finds no image in it, so that the caller can report the bytes
    as an unknown format instead.

    Raises:
        CorruptImageError: a malformed or truncated file, or pixel data that cannot be decoded.
        UnsupportedModalityError: a Modality other than :data:`ACCEPTED_MODALITIES`.
        UnsupportedImageError: no pixel data, an unsupported transfer syntax or pixel format.
        ImageTooLargeError: Rows * Columns above ``max_pixels`` (checked before decoding).
    """
    with _pydicom_quiet():
        ds = _read(data, raw=raw)
        _check_modality(ds)
        _check_pixel_module(ds, max_pixels)
        frame = _first_frame(ds)
        gray = _to_grayscale(frame, ds)
    height, width = gray.shape
    return DicomPixels(pixels=gray, width=int(width), height=int(height))


class NotDicomError(CorruptImageError):
    """Bytes given to a forced (preamble-less) read that turn out to hold no DICOM image."""


def _read(data: bytes, *, raw: bool) -> Dataset:
    """Parse the whole dataset (pixel data included, still encoded)."""
    try:
        # Element values are converted later, on access: only the pixel module and Modality are
        # ever read, and the identifying tags are never touched. (pydicom's strict_reading() is
        # not used: it flips a process-wide setting, and the web decodes in several threads.)
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        cut_short = len(ds) > 0 and _is_cut_short(ds, data)
    # pydicom raises a wide range of exceptions on damaged input (EOFError, struct.error,
    # ValueError, KeyError, IndexError, TypeError, NotImplementedError, OverflowError, ...) and
    # does not promise which; any of them means "this file cannot be read". The message never
    # repeats pydicom's, which may quote tag values (a patient's name).
    except Exception as exc:
        if raw:
            raise NotDicomError("not a DICOM dataset") from exc
        raise CorruptImageError(
            "the data starts like a DICOM file but it is malformed or truncated and cannot be "
            f"read ({type(exc).__name__})"
        ) from exc
    if raw and not ("PixelData" in ds and "Rows" in ds and "Columns" in ds):
        raise NotDicomError("not a DICOM image")
    if cut_short:
        # pydicom reads a value cut short by the end of the data without complaint.
        raise CorruptImageError("the DICOM file is truncated: its last element is cut short")
    if not raw and (not ds.file_meta.get("TransferSyntaxUID") or len(ds) == 0):
        # "DICM" must be followed by the file meta group, which names the transfer syntax.
        raise CorruptImageError(
            "the data starts like a DICOM file but its header is malformed (no file meta "
            "information with a transfer syntax)"
        )
    return ds


def _is_cut_short(ds: Dataset, data: bytes) -> bool:
    """Whether the data ends inside the dataset's last top-level element or its successor's header.

    pydicom stops without complaint at a value cut short (it keeps the bytes there are) and at a
    partial element header (fewer bytes than a header needs are taken as the end of the data),
    and it decodes encapsulated pixel data whose end is missing as far as it goes.
    """
    last: Any = ds.get_item(max(ds.keys()))
    if not isinstance(last, RawDataElement):
        return False
    if last.length == _UNDEFINED_LENGTH:
        # Encapsulated pixel data (or a sequence) ends with a sequence delimitation item.
        start = int(last.value_tell)
        return (
            data.rfind(_SEQUENCE_DELIMITER_LE, start) < 0
            and data.rfind(_SEQUENCE_DELIMITER_BE, start) < 0
        )
    end = int(last.value_tell) + int(last.length)
    size = len(data)
    return end > size or 0 < size - end < _LONGEST_ELEMENT_HEADER


def _check_modality(ds: Dataset) -> None:
    """Refuse anything but a projection X-ray (see :data:`ACCEPTED_MODALITIES`)."""
    try:
        modality = str(ds.get("Modality") or "").strip().upper()
    except Exception as exc:  # a value pydicom cannot convert (e.g. a broken VR)
        raise CorruptImageError(
            f"the DICOM's Modality cannot be read ({type(exc).__name__})"
        ) from exc
    if modality and modality not in ACCEPTED_MODALITIES:
        # The modality code is a defined term (CT, MR, ...), not patient data: safe to repeat.
        shown = modality if modality.isalnum() and len(modality) <= 16 else "unknown"
        raise UnsupportedModalityError(
            f"this DICOM is a {shown} image, not a projection X-ray; only chest radiographs "
            f"(Modality {', '.join(sorted(ACCEPTED_MODALITIES))}) can be classified"
        )


def _check_pixel_module(ds: Dataset, max_pixels: int) -> None:
    """Refuse, from the header alone, what cannot or must not be decoded."""
    if "PixelData" not in ds and "Rows" in ds and "Columns" in ds:
        raise CorruptImageError(
            "the DICOM describes an image but has no pixel data: the file is truncated"
        )
    if "PixelData" not in ds:
        other = "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
        raise UnsupportedImageError(
            "this DICOM has floating-point pixel data, which X-rays do not use; "
            "please upload a CR or DX image"
            if other
            else "this DICOM has no pixel data (it is not an image, e.g. a report or a "
            "structured document); please upload a CR or DX image"
        )
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        bits_allocated, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
        samples = int(ds.get("SamplesPerPixel") or 1)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
    except Exception as exc:  # missing or non-numeric values of the Image Pixel module
        raise CorruptImageError(
            "the DICOM's image description (rows, columns, bits, photometric interpretation) "
            f"is missing or malformed ({type(exc).__name__})"
        ) from exc
    if rows < 1 or columns < 1 or not 1 <= bits_stored <= bits_allocated <= 32:
        raise CorruptImageError(
            f"the DICOM describes an impossible image ({columns}x{rows} pixels, "
            f"{bits_stored} of {bits_allocated} bits)"
        )
    if rows * columns > max_pixels:
        raise ImageTooLargeError(
            f"the image is {columns}x{rows} = {rows * columns:,} pixels, "
            f"above the limit of {max_pixels:,} pixels"
        )
    one_sample = photometric in _MONOCHROME or photometric == "PALETTE COLOR"
    if photometric not in _MONOCHROME | _COLOUR or samples != (1 if one_sample else 3):
        raise UnsupportedImageError(
            f"DICOM images with photometric interpretation {photometric[:20]!r} and "
            f"{samples} samples per pixel are not supported; please upload a MONOCHROME1/2 "
            "(or RGB) image"
        )

    syntax = _transfer_syntax(ds)
    if syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        name = syntax.name if syntax.is_valid and syntax.name != syntax else "unknown"
        raise UnsupportedImageError(
            f"the DICOM's transfer syntax {name} ({str(syntax)[:64]}) is not supported; "
            "supported: " + ", ".join(SUPPORTED_TRANSFER_SYNTAXES.values())
        )
    if not get_decoder(syntax).is_available:
        # A deployment without the optional decoder packages installed.
        raise UnsupportedImageError(
            f"{SUPPORTED_TRANSFER_SYNTAXES[syntax]} DICOMs cannot be decoded by this server "
            "(its decoder package is not installed)"
        )


def _transfer_syntax(ds: Dataset) -> dicom_uid.UID:
    """The dataset's transfer syntax, inferred for a preamble-less dataset without file meta."""
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if syntax:
        return dicom_uid.UID(str(syntax))
    # A raw dataset has no file meta: its encoding is what the forced read found, and it can
    # only be an uncompressed one.
    implicit, little = ds.original_encoding
    if implicit:
        inferred = dicom_uid.ImplicitVRLittleEndian
    elif little:
        inferred = dicom_uid.ExplicitVRLittleEndian
    else:
        inferred = dicom_uid.ExplicitVRBigEndian
    if file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = inferred
    return inferred


def _first_frame(ds: Dataset) -> npt.NDArray[Any]:
    """Decode only the first frame: (rows, columns) or (rows, columns, samples)."""
    try:
        plugin = _PREFERRED_PLUGIN.get(ds.file_meta.TransferSyntaxUID)
        frame = None
        if plugin is not None:
            with contextlib.suppress(Exception):
                frame = dicom_pixel_array(ds, index=0, decoding_plugin=plugin)
        if frame is None:
            frame = dicom_pixel_array(ds, index=0)
    # As in _read: decoders (numpy reshapes, Pillow, libjpeg) raise many exception types on
    # damaged or truncated pixel data.
    except Exception as exc:
        raise CorruptImageError(
            "the DICOM's pixel data is truncated or damaged and cannot be decoded "
            f"({type(exc).__name__})"
        ) from exc
    if frame.ndim not in (2, 3) or frame.size == 0:
        raise CorruptImageError(
            f"the DICOM's pixel data decoded to an unusable shape {frame.shape}"
        )
    return frame


def _to_grayscale(frame: npt.NDArray[Any], ds: Dataset) -> npt.NDArray[np.uint8]:
    """Map one decoded frame to 8-bit grayscale following the rule in the module docstring."""
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric in _COLOUR:
        return _colour_to_luma(frame, ds, photometric)
    try:
        values = apply_modality_lut(frame, ds)
        has_voi_lut = bool(ds.get("VOILUTSequence"))
        has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
        if has_voi_lut or has_window:
            voi = apply_voi_lut(values, ds, index=0)
            gray = _voi_output_to_uint8(voi, ds, from_lut=has_voi_lut)
        else:
            gray = _unwindowed_to_uint8(values, ds)
    except CorruptImageError:
        raise
    except Exception as exc:  # e.g. a window width < 1, a LUT descriptor that does not fit
        raise CorruptImageError(
            "the DICOM's modality LUT, VOI LUT or window is invalid and cannot be applied "
            f"({type(exc).__name__})"
        ) from exc
    if photometric == "MONOCHROME1":
        gray = np.subtract(255, gray, dtype=np.uint8)
    return np.ascontiguousarray(gray)


def _unwindowed_to_uint8(values: npt.NDArray[Any], ds: Dataset) -> npt.NDArray[np.uint8]:
    """8-bit unsigned with no rescale: as it is; anything else: min..max stretch."""
    identity = "ModalityLUTSequence" not in ds and (
        "RescaleSlope" not in ds
        or (float(ds.RescaleSlope) == 1.0 and float(ds.get("RescaleIntercept") or 0.0) == 0.0)
    )
    if (
        identity
        and int(ds.BitsStored) == 8
        and int(ds.get("PixelRepresentation") or 0) == 0
        and values.dtype.kind in "ui"
    ):
        return np.array(np.clip(values, 0, 255), dtype=np.uint8)
    return stretch_to_uint8(values)


def _voi_output_to_uint8(
    voi: npt.NDArray[Any], ds: Dataset, *, from_lut: bool
) -> npt.NDArray[np.uint8]:
    """Map the VOI stage's output range (not the image's own range) linearly onto 0..255."""
    if from_lut:
        # The whole table as pydicom reads it (LUT Data may be US or OW, either endianness).
        entries, first = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor[:2])
        domain = np.arange(first, first + (entries or 1 << 16), dtype=np.int64)
        table = apply_voi(domain, ds, index=0)
        low, high = float(table.min()), float(table.max())
    else:
        low, high = _window_output_range(ds)
    if high <= low:
        return np.zeros(voi.shape, dtype=np.uint8)
    scaled = np.rint((voi.astype(np.float64) - low) * (255.0 / (high - low)))
    return np.clip(scaled, 0.0, 255.0).astype(np.uint8)


def _window_output_range(ds: Dataset) -> tuple[float, float]:
    """The range pydicom's ``apply_windowing`` maps a window onto (PS3.3 C.11.2.1.2)."""
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation") or 0) == 0:
        low, high = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        low, high = (
            float(-(2 ** (int(ds.BitsStored) - 1))),
            float(2 ** (int(ds.BitsStored) - 1) - 1),
        )
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = low * slope + intercept, high * slope + intercept
    return min(low, high), max(low, high)


def _colour_to_luma(
    frame: npt.NDArray[Any], ds: Dataset, photometric: str
) -> npt.NDArray[np.uint8]:
    """Reduce a colour frame to luma (Pillow's integer ITU-R 601-2 weights)."""
    try:
        if photometric == "PALETTE COLOR":
            rgb = apply_color_lut(frame, ds)
            bits = 8 * rgb.dtype.itemsize  # the palette's entries are 8 or 16 bits
        else:
            rgb, bits = frame, int(ds.BitsStored)
    except Exception as exc:
        raise CorruptImageError(
            f"the DICOM's colour palette is invalid and cannot be applied ({type(exc).__name__})"
        ) from exc
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise UnsupportedImageError(
            f"colour DICOM pixel data of shape {rgb.shape} is not supported"
        )
    channels = rgb.astype(np.int64)
    if bits > 8:
        # Deeper colour is brought to 8 bits per channel first, keeping the top bits.
        channels = channels >> (bits - 8)
    channels = np.clip(channels, 0, 255)
    luma = (
        channels[..., 0] * 19595 + channels[..., 1] * 38470 + channels[..., 2] * 7471 + 0x8000
    ) >> 16
    return np.ascontiguousarray(luma.astype(np.uint8))


@contextlib.contextmanager
def _pydicom_quiet() -> Iterator[None]:
    """Silence pydicom's warnings about the file while the block runs.

    They describe the uploader's file, not our code, and some quote the offending value (e.g.
    "Invalid value for VR PN: 'DOE^JOHN'"): patient data must not reach the logs. Each upload
    either decodes or raises an ImageError.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
        yield
