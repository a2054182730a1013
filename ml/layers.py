"""Keras layers of the classifier's own preprocessing, saved inside every ``.keras`` version.

:class:`IntensityNormalization` evens out what differs in grey levels between sites (exposure,
windowing, the export's contrast curve) per image, inside the model's graph, so a model is
trained and served on the same transform. Its methods (``ml.config.Intensity``):

- ``standardize``: ``(x - mean) / max(std, min_std)`` per image, as
  ``tf.image.per_image_standardization`` does (which floors the std at ``1/sqrt(pixels)`` only
  to avoid a division by zero; ``min_std`` is in the input's units: one grey level by default,
  so a blank image is not blown up into noise).
- ``equalize``: histogram equalisation per image: a 256-bin histogram over 0..255, its
  cumulative sum as the lookup table, ``(cdf(v) - cdf_min) / (pixels - cdf_min)`` (the darkest
  level present maps to 0, the brightest to 1). Any increasing change of the grey levels
  (contrast, brightness, gamma) leaves the ranks, and so the output, nearly unchanged.

Either result is then mapped to ``offset + scale * result``; the classifier picks ``offset`` and
``scale`` so that its next layers (VGG16's preprocessing) get the range they expect.

The layer computes in float32 whatever its dtype policy (its input is not cast down to
bfloat16/float16: 8 bits of mantissa would merge grey levels before the histogram) and returns
its policy's compute dtype. Registered with Keras (``cxr>IntensityNormalization``): importing this
module is enough for ``keras.saving.load_model`` to load a model that has one (ml.versions and
ml.model import it). TensorFlow module (workers, trainer, CLI and tests only).
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

__all__ = ["INTENSITY_LAYER", "IntensityNormalization", "intensity_of"]

METHODS = ("standardize", "equalize")  # ml.config.Intensity without "none" (= no layer)
INTENSITY_LAYER = "intensity"  # the layer's name in the classifier (ml.model.build_classifier)
LEVELS = 256  # grey levels of the 0..255 input: one histogram bin each
VALUE_RANGE = (0.0, 255.0)


@keras.saving.register_keras_serializable(package="cxr")
class IntensityNormalization(keras.layers.Layer):
    """Per-image intensity normalisation of ``(batch, h, w, c)`` images in 0..255.

    Args:
        method: ``"standardize"`` or ``"equalize"`` (see the module docstring).
        offset: Added to the normalised image (default 0).
        scale: Multiplies the normalised image (default 1: standardize gives mean 0 and std 1,
            equalize values in [0, 1]).
        min_std: Floor of the std ``standardize`` divides by, in the input's units.
    """

    def __init__(
        self,
        method: str,
        offset: float = 0.0,
        scale: float = 1.0,
        min_std: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if min_std <= 0:
            raise ValueError(f"min_std must be positive, got {min_std}")
        self.method = method
        self.offset = float(offset)
        self.scale = float(scale)
        self.min_std = float(min_std)

    @property
    def input_dtype(self) -> str:
        """float32 under every policy: Keras would otherwise cast the input to 16 bits first."""
        return "float32"

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        x = tf.cast(inputs, tf.float32)
        normalised = self._standardize(x) if self.method == "standardize" else self._equalize(x)
        return tf.cast(self.offset + self.scale * normalised, self.compute_dtype)

    def _standardize(self, x: tf.Tensor) -> tf.Tensor:
        mean, variance = tf.nn.moments(x, axes=[1, 2, 3], keepdims=True)
        return (x - mean) / tf.maximum(tf.sqrt(variance), self.min_std)

    def _equalize(self, x: tf.Tensor) -> tf.Tensor:
        n = tf.shape(x)[0]
        flat = tf.reshape(x, tf.stack([n, -1]))
        # Bin indices 0..255 (values outside 0..255 fall into the end bins); one batched
        # bincount gives every image's histogram without a per-image loop.
        bins = tf.histogram_fixed_width_bins(flat, VALUE_RANGE, nbins=LEVELS)
        counts = tf.math.bincount(
            bins, minlength=LEVELS, maxlength=LEVELS, axis=-1, dtype=tf.float32
        )
        cdf = tf.cumsum(counts, axis=1)
        pixels = cdf[:, -1:]
        # The count of the darkest level present: it maps to 0 (else a large black border
        # would start the output well above black).
        cdf_min = tf.reduce_min(tf.where(cdf > 0, cdf, pixels), axis=1, keepdims=True)
        # A flat image (one level only) has nothing to spread: it maps to 0.
        table = (cdf - cdf_min) / tf.maximum(pixels - cdf_min, 1.0)
        return tf.reshape(tf.gather(table, bins, batch_dims=1), tf.shape(x))

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "method": self.method,
            "offset": self.offset,
            "scale": self.scale,
            "min_std": self.min_std,
        }


def intensity_of(model: keras.Model) -> str:
    """The intensity method ``model`` normalises its input with: ``"none"`` without the layer."""
    for layer in model.layers:
        if isinstance(layer, IntensityNormalization):
            return layer.method
    return "none"
