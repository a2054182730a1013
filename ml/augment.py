"""Training-time augmentation: batches of grayscale X-rays (0..255) varied as other films vary.

Two sets, both in the ``tf.data`` input pipeline only (never part of a saved model, so serving
is unaffected):

- **light** (``augment``): small rotations, zooms and shifts, the jitter of patient position.
- **sites** (``site_augment``): what differs between sites, scanners and export paths rather
  than between patients: the aspect (an image squashed to a square from a wider or taller film,
  as `cxr-kaggle-test-256` was and as every non-square upload is by ``to_model_input``), a
  softer image (a film downscaled and upscaled again), contrast, gamma, brightness and sensor
  noise.

No horizontal flip in either: a flipped chest puts the heart on the right (dextrocardia, a
finding in its own right) and mirrors the side markers, images the model will not be sent.
TensorFlow is imported only inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = ["SITE_RANGES", "build_augmenter"]

# The ranges of the site augmentation. Aspect: a film up to 1.45x wider (or taller) than high,
# squashed to a square, shrinks one axis to 69-100 % (a 4:3 film gives 75 %). Softening: downscale
# to 55-100 % of the side and back (224 px upscaled to 256 px is 88 %). The photometric ranges are
# those of exposure and windowing differences between exports.
SITE_RANGES: dict[str, tuple[float, float]] = {
    "squash": (0.69, 1.0),
    "soften": (0.55, 1.0),
    "contrast": (0.7, 1.3),
    "gamma": (0.7, 1.4),
    "brightness": (-20.0, 20.0),
    "noise_std": (0.0, 6.0),
}


def build_augmenter(
    seed: int, *, light: bool = True, sites: bool = False
) -> Callable[[tf.Tensor], tf.Tensor] | None:
    """Return a function that augments a batch ``(n, s, s, 1)`` float32 in 0..255, or None.

    ``light`` and ``sites`` select the two sets described in the module docstring; with neither
    there is nothing to do (``None``). Draws come from generators seeded with ``seed``, so a run
    is repeatable when the pipeline calls the function in a fixed order.
    """
    if not light and not sites:
        return None
    steps: list[Callable[[tf.Tensor], tf.Tensor]] = []
    if sites:
        steps.append(_site_geometry(seed + 10))
    if light:
        steps.append(_light(seed))
    if sites:
        steps.append(_site_photometry(seed + 20))

    def augment(images: tf.Tensor) -> tf.Tensor:
        for step in steps:
            images = step(images)
        return images

    return augment


def _light(seed: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """Small rotations (±5°), zooms (±10 %) and shifts (±5 %), per image."""
    import keras

    # "reflect" fills the few border pixels with nearby anatomy instead of artificial black bars.
    layers = [
        keras.layers.RandomRotation(5 / 360, fill_mode="reflect", seed=seed),
        keras.layers.RandomZoom(0.1, fill_mode="reflect", seed=seed + 1),
        keras.layers.RandomTranslation(0.05, 0.05, fill_mode="reflect", seed=seed + 2),
    ]

    def apply(images: tf.Tensor) -> tf.Tensor:
        for layer in layers:
            images = layer(images, training=True)
        return images

    return apply


def _site_geometry(seed: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """Squash one axis (then pad back to a square at the border's level) and soften, per batch."""
    import tensorflow as tf

    rng = tf.random.Generator.from_seed(seed)
    squash_lo, squash_hi = SITE_RANGES["squash"]
    soften_lo, soften_hi = SITE_RANGES["soften"]

    def apply(images: tf.Tensor) -> tf.Tensor:
        size = tf.shape(images)[1]
        side = tf.cast(size, tf.float32)
        # One draw per batch keeps the op shapes static within a batch; batches differ.
        squash = rng.uniform([], squash_lo, squash_hi)
        squashed = tf.maximum(tf.cast(tf.round(side * squash), tf.int32), 1)
        horizontal = rng.uniform([]) < 0.8  # films are mostly wider than high
        height = tf.where(horizontal, size, squashed)
        width = tf.where(horizontal, squashed, size)
        resized = tf.image.resize(images, tf.stack([height, width]), method="bilinear")
        pad_h, pad_w = size - height, size - width
        paddings = [
            [0, 0],
            [pad_h // 2, pad_h - pad_h // 2],
            [pad_w // 2, pad_w - pad_w // 2],
            [0, 0],
        ]
        # What lies beyond a cropped film is unknown: fill with the level of the image's own
        # border (a reflection would mirror ribs into the margin, which no film shows).
        rows = tf.concat([resized[:, :2], resized[:, -2:]], axis=1)
        cols = tf.concat([resized[:, :, :2], resized[:, :, -2:]], axis=2)
        border = (
            tf.reduce_mean(rows, axis=[1, 2, 3], keepdims=True)
            + tf.reduce_mean(cols, axis=[1, 2, 3], keepdims=True)
        ) / 2
        inside = tf.pad(tf.ones_like(resized), paddings)
        padded = tf.pad(resized, paddings) + (1.0 - inside) * border
        padded = tf.image.resize(padded, tf.stack([size, size]), method="bilinear")
        soften = rng.uniform([], soften_lo, soften_hi)
        small = tf.maximum(tf.cast(tf.round(side * soften), tf.int32), 1)
        softened = tf.image.resize(padded, tf.stack([small, small]), method="area")
        out = tf.image.resize(softened, tf.stack([size, size]), method="bilinear")
        return tf.ensure_shape(out, images.shape)

    return apply


def _site_photometry(seed: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """Contrast, gamma, brightness and Gaussian noise, drawn per image, clipped to 0..255."""
    import tensorflow as tf

    rng = tf.random.Generator.from_seed(seed)

    def draw(images: tf.Tensor, name: str) -> tf.Tensor:
        lo, hi = SITE_RANGES[name]
        n = tf.shape(images)[0]
        return rng.uniform(tf.stack([n, 1, 1, 1]), lo, hi)

    def apply(images: tf.Tensor) -> tf.Tensor:
        x = images / 255.0
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = tf.clip_by_value((x - mean) * draw(images, "contrast") + mean, 0.0, 1.0)
        x = tf.pow(x, draw(images, "gamma"))
        x = x * 255.0 + draw(images, "brightness")
        x = x + rng.normal(tf.shape(images)) * draw(images, "noise_std")
        return tf.clip_by_value(x, 0.0, 255.0)

    return apply
