"""DICOM files generated for tests with pydicom (no binary fixture is committed)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

# Values of identifying tags that the de-identification test searches for everywhere.
IDENTIFYING = {
    "PatientName": "Zyxwvut^Qwertyuiop",
    "PatientID": "PID-80458317",
    "PatientBirthDate": "19230417",
    "StudyDate": "20240229",
    "InstitutionName": "Hospital of Saint Ymmidlerg",
}


def dicom_bytes(
    pixels: npt.NDArray[Any],
    *,
    bits_stored: int | None = None,
    photometric: str = "MONOCHROME2",
    modality: str | None = "DX",
    syntax: str = uid.ExplicitVRLittleEndian,
    window: tuple[float, float] | None = None,
    voi_lut: tuple[int, int, Sequence[int]] | None = None,
    rescale: tuple[float, float] | None = None,
    identifying: bool = False,
    with_pixels: bool = True,
    preamble: bool = True,
) -> bytes:
    """A DICOM file of ``pixels`` (2-D, 3-D frames or (rows, cols, 3) RGB), uncompressed or RLE
    or JPEG-LS (encoded by pydicom), in ``syntax``.

    ``pixels`` holds the stored values: its dtype gives Bits Allocated and Pixel Representation.
    ``voi_lut`` is (first mapped value, bits per entry, table).
    """
    ds = _dataset(pixels, bits_stored, photometric, modality, identifying)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        first, bits, table = voi_lut
        item = Dataset()
        item.add_new("LUTDescriptor", "US", [len(table), first, bits])
        item.add_new("LUTData", "OW", np.asarray(table, dtype="<u2").tobytes())
        ds.VOILUTSequence = [item]
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    if with_pixels:
        if syntax in (uid.RLELossless, uid.JPEGLSLossless, uid.JPEGLSNearLossless):
            kwargs: dict[str, Any] = {"jls_error": 2} if syntax == uid.JPEGLSNearLossless else {}
            ds.compress(syntax, pixels, **kwargs)
        else:
            order = ">" if syntax == uid.ExplicitVRBigEndian else "<"
            ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(order)).tobytes()
            ds["PixelData"].VR = "OB" if pixels.dtype.itemsize == 1 else "OW"
            ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    return _write(ds, preamble)


def encapsulated_dicom(
    frames: Sequence[bytes],
    shape: tuple[int, int],
    syntax: str,
    *,
    bits_stored: int = 8,
    photometric: str = "MONOCHROME2",
    modality: str | None = "DX",
) -> bytes:
    """A DICOM file whose pixel data is ``frames`` (already compressed in ``syntax``)."""
    template = np.zeros(shape, dtype=np.uint8 if bits_stored <= 8 else np.uint16)
    ds = _dataset(template, bits_stored, photometric, modality, False)
    if photometric != "MONOCHROME2" and photometric != "MONOCHROME1":
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate(list(frames))
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = syntax
    return _write(ds, True)


def pillow_frame(pixels: npt.NDArray[Any], fmt: str, **params: Any) -> bytes:
    """``pixels`` compressed by Pillow ("JPEG", or "JPEG2000" as a bare J2K codestream)."""
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if fmt == "JPEG2000":
        params.setdefault("no_jp2", True)
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def jpeg_lossless_frame(pixels: npt.NDArray[Any], precision: int) -> bytes:
    """A JPEG lossless (process 14, first-order prediction) codestream of a 2-D image.

    Neither Pillow nor pydicom can write one, so this is a minimal encoder (ITU-T T.81 H.1):
    predictor 1 (left; above for the first column), one Huffman table giving every difference
    category 0..16 a 5-bit code.
    """
    rows, cols = pixels.shape
    values = pixels.astype(np.int64)
    predicted = np.empty_like(values)
    predicted[0, 0] = 1 << (precision - 1)
    predicted[0, 1:] = values[0, :-1]
    predicted[1:, 0] = values[:-1, 0]
    predicted[1:, 1:] = values[1:, :-1]
    diffs = (values - predicted) % 65536
    diffs = np.where(diffs >= 32768, diffs - 65536, diffs)

    bits: list[str] = []
    for diff in diffs.ravel().tolist():
        category = 16 if diff == 32768 else int(abs(diff)).bit_length()
        bits.append(format(category, "05b"))
        if 0 < category < 16:
            extra = diff if diff >= 0 else diff - 1
            bits.append(format(extra & ((1 << category) - 1), f"0{category}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    scan = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        scan.append(byte)
        if byte == 0xFF:
            scan.append(0x00)  # byte stuffing

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    sof = (
        bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + b"\x01\x01\x11\x00"
    )
    counts = bytes([0, 0, 0, 0, 17] + [0] * 11)
    dht = b"\x00" + counts + bytes(range(17))
    sos = b"\x01\x01\x00" + bytes([1, 0, 0])  # predictor 1, Se 0, point transform 0
    return (
        b"\xff\xd8"
        + segment(0xC3, sof)
        + segment(0xC4, dht)
        + segment(0xDA, sos)
        + bytes(scan)
        + b"\xff\xd9"
    )


def _dataset(
    pixels: npt.NDArray[Any],
    bits_stored: int | None,
    photometric: str,
    modality: str | None,
    identifying: bool,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    if modality is not None:
        ds.Modality = modality
    if identifying:
        for keyword, value in IDENTIFYING.items():
            setattr(ds, keyword, value)
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2")
    frames = pixels.shape[0] if pixels.ndim == 3 and not colour else 1
    rows, cols = pixels.shape[1:3] if frames > 1 else pixels.shape[:2]
    ds.Rows, ds.Columns = rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    return ds


def _write(ds: Dataset, preamble: bool) -> bytes:
    buffer = io.BytesIO()
    if preamble:
        ds.save_as(buffer, enforce_file_format=True)
    else:
        # A "raw" dataset: no preamble, no "DICM", no file meta (as some older tools write).
        syntax = ds.file_meta.TransferSyntaxUID
        del ds.file_meta
        ds.save_as(
            buffer,
            implicit_vr=syntax == uid.ImplicitVRLittleEndian,
            little_endian=syntax != uid.ExplicitVRBigEndian,
        )
    return buffer.getvalue()
