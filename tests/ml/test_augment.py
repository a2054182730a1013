"""The augmentation sets: shapes and range kept, repeatable by seed, no mirror, what each varies."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from ml.augment import SITE_RANGES, build_augmenter


def batch(n: int = 8, size: int = 64) -> np.ndarray:
    """Chest-like test images: a bright block on the left half of a horizontal gradient."""
    x = np.tile(np.linspace(40, 200, size, dtype=np.float32), (n, size, 1))
    x[:, size // 4 : size // 2, 4 : size // 3] = 250.0
    return x[..., np.newaxis]


def test_nothing_to_do_without_a_set() -> None:
    assert build_augmenter(1, light=False, sites=False) is None


@pytest.mark.parametrize(("light", "sites"), [(True, False), (False, True), (True, True)])
def test_shape_dtype_and_range_are_kept(light: bool, sites: bool) -> None:
    augment = build_augmenter(3, light=light, sites=sites)
    assert augment is not None
    out = augment(tf.constant(batch())).numpy()
    assert out.shape == (8, 64, 64, 1) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 255.0
    assert not np.allclose(out, batch())


def test_the_same_seed_gives_the_same_batches() -> None:
    first, second = (build_augmenter(7, sites=True) for _ in range(2))
    assert first is not None and second is not None
    for _ in range(2):
        x = tf.constant(batch())
        np.testing.assert_allclose(first(x).numpy(), second(x).numpy(), atol=1e-4)


def test_no_set_mirrors_the_chest() -> None:
    # Bright on the left, dark on the right: after any augmentation the left half stays the
    # brighter one (a mirror would swap them).
    augment = build_augmenter(11, light=True, sites=True)
    assert augment is not None
    x = np.full((16, 64, 64, 1), 20.0, dtype=np.float32)
    x[:, 8:56, 4:28] = 230.0
    for _ in range(5):
        out = augment(tf.constant(x)).numpy()[..., 0]
        assert (out[:, :, :32].mean(axis=(1, 2)) > out[:, :, 32:].mean(axis=(1, 2))).all()


def test_site_geometry_squashes_one_axis() -> None:
    # A vertical stripe grows narrower when the width is squashed; over a few batches the
    # stripe's width must vary and never widen beyond the original by more than blur.
    augment = build_augmenter(5, light=False, sites=True)
    assert augment is not None
    x = np.zeros((4, 64, 64, 1), dtype=np.float32)
    x[:, :, 24:40] = 255.0
    widths = []
    for _ in range(12):
        out = augment(tf.constant(x)).numpy()[..., 0]
        row = out[:, 32, :]
        # Photometry moves levels; count columns above the row's midpoint level.
        mid = (row.max(axis=1, keepdims=True) + row.min(axis=1, keepdims=True)) / 2
        widths.extend((row > mid).sum(axis=1).tolist())
    assert min(widths) < 15 and max(widths) <= 20
    assert SITE_RANGES["squash"][0] < 1.0


def test_site_photometry_varies_per_image() -> None:
    augment = build_augmenter(9, light=False, sites=True)
    assert augment is not None
    x = np.full((16, 32, 32, 1), 128.0, dtype=np.float32)
    out = augment(tf.constant(x)).numpy()
    means = out.mean(axis=(1, 2, 3))
    assert means.std() > 2.0  # brightness, gamma and contrast differ between images
