"""Chest X-ray files at the sizes users send, made from the shared real X-rays.

The shared data set holds 256 px thumbnails; real files are 1-3k px and 0.5-30 MB. These helpers
scale a real X-ray up to a real size and add film grain (seeded), so the files have the size, bit
depth and entropy of scanner output: a smooth upscale alone would compress to a fraction of a real
file's bytes. Without $CXR_TEST_DATA_DIR a synthetic chest-like picture stands in, so unit tests
never depend on the data set (the end-to-end tests use the real one).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

DATA_DIR = os.environ.get("CXR_TEST_DATA_DIR")


@lru_cache(maxsize=1)
def base_xray() -> npt.NDArray[np.float32]:
    """One real X-ray (the first test-split PNEUMONIA image) as floats 0..255, or a stand-in."""
    if DATA_DIR:
        folder = Path(DATA_DIR) / "test" / "PNEUMONIA"
        path = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpeg", ".jpg"})[0]
        return np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32) / 255.0
    lungs = np.exp(-(((xx - 0.3) ** 2) / 0.02 + ((yy - 0.5) ** 2) / 0.08))
    lungs += np.exp(-(((xx - 0.7) ** 2) / 0.02 + ((yy - 0.5) ** 2) / 0.08))
    return np.clip(200.0 - 140.0 * lungs, 0, 255).astype(np.float32)


def xray_pixels(width: int, height: int, grain: float, seed: int = 0) -> npt.NDArray[np.float64]:
    """The base X-ray scaled to ``width`` x ``height`` with Gaussian grain, floats 0..1."""
    base = Image.fromarray(base_xray()).resize((width, height), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(seed)
    pixels = np.asarray(base, dtype=np.float64) / 255.0
    return np.clip(pixels + rng.normal(0.0, grain, pixels.shape), 0.0, 1.0)


def jpeg_xray(width: int, height: int, *, grain: float = 0.02, quality: int = 92) -> bytes:
    """An 8-bit grayscale JPEG X-ray of ``width`` x ``height``."""
    pixels = np.rint(xray_pixels(width, height, grain) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def png16_xray(width: int, height: int, *, grain: float = 0.01, bits: int = 12) -> bytes:
    """A 16-bit grayscale PNG X-ray whose values use ``bits`` bits, as CR/DX systems write."""
    pixels = np.rint(xray_pixels(width, height, grain) * ((1 << bits) - 1)).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def rgb_png_xray(width: int, height: int, *, grain: float = 0.02) -> bytes:
    """An RGB PNG X-ray (a screenshot or an export from a viewer), channels slightly apart."""
    gray = xray_pixels(width, height, grain)
    rgb = np.stack([gray, gray * 0.98, gray * 0.96], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(np.rint(rgb * 255).astype(np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def png_of_size(total_bytes: int, *, width: int = 640, height: int = 512) -> bytes:
    """A valid 8-bit X-ray PNG padded to exactly ``total_bytes`` with a private ancillary chunk.

    Decoders skip unknown ancillary chunks (lower-case first letter), so the file is an ordinary
    image of ``total_bytes`` whose decoding costs what a 640 px PNG costs; the padding is random,
    so it is as hard on the multipart parser as any scanner's output.
    """
    buffer = io.BytesIO()
    pixels = np.rint(xray_pixels(width, height, 0.02) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    image = buffer.getvalue()
    iend = image.rindex(b"IEND") - 4  # the IEND chunk starts with its 4-byte length
    padding = total_bytes - len(image) - 12  # a chunk: length, type, data, CRC
    if padding < 0:
        raise ValueError(f"{total_bytes} bytes is smaller than the image itself ({len(image)})")
    data = np.random.default_rng(1).bytes(padding)
    chunk = struct.pack(">I", padding) + b"cxRp" + data
    chunk += struct.pack(">I", zlib.crc32(chunk[4:]) & 0xFFFFFFFF)
    out = image[:iend] + chunk + image[iend:]
    assert len(out) == total_bytes
    return out
