"""The overlay (ml.overlay): viridis without matplotlib, the image's aspect, a legend strip."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from ml.overlay import VIRIDIS, colorize, map_from_json, render_from_stored, render_overlay


def test_the_lookup_table_is_matplotlibs_viridis() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    reference = np.array([matplotlib.colormaps["viridis"](i / 255)[:3] for i in range(256)]) * 255
    assert VIRIDIS.shape == (256, 3) and VIRIDIS.dtype == np.uint8
    assert np.abs(VIRIDIS.astype(np.float64) - reference).max() <= 3.5


def test_colours_get_lighter_from_low_to_high() -> None:
    rgb = colorize(np.linspace(0, 1, 256)).astype(np.float64)
    luma = rgb @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luma) >= -0.5)  # monotonic lightness: readable in grayscale too


def test_overlay_keeps_the_aspect_and_adds_a_legend() -> None:
    gray = np.full((120, 300), 100, np.uint8)
    values = np.zeros((4, 4), np.float32)
    values[0, 3] = 1.0  # upper right
    png = render_overlay(gray, values, "PNEUMONIA")
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.width == 300 and image.height > 120  # the legend strip below
        pixels = np.asarray(image)
    hot, cold = pixels[5, 295].astype(int), pixels[115, 5].astype(int)
    assert hot[0] > cold[0] and hot[1] > cold[1]  # yellow-ish over purple-ish
    legend = pixels[120:]
    assert (legend.min(axis=2) < 100).any()  # text and the colour bar are drawn


def test_stored_documents_round_trip() -> None:
    gray = np.tile(np.arange(64, dtype=np.uint8), (48, 1))
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, "PNG")
    doc = {"class_explained": "NORMAL", "shape": [2, 2], "values": [[0, 0.5], [1, 0.25]]}
    png = render_from_stored(buffer.getvalue(), json.dumps(doc))
    with Image.open(io.BytesIO(png)) as image:
        assert image.width == 64
    assert map_from_json(doc).dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        map_from_json({**doc, "shape": [4, 1]})


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="opacity"):
        render_overlay(np.zeros((8, 8), np.uint8), np.zeros((2, 2)), "x", opacity=2)
    with pytest.raises(ValueError, match="2-D uint8"):
        render_overlay(np.zeros((8, 8, 3), np.uint8), np.zeros((2, 2)), "x")
