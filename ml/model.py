"""The VGG16 transfer-learning classifier: building it and running it on preprocessed images."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ml.config import INTENSITIES
from ml.decision import decide, negative_index
from ml.explain import build_explainer
from ml.layers import INTENSITY_LAYER, IntensityNormalization
from ml.ood import MahalanobisGate, feature_model
from ml.precision import model_precision

# Caffe-style VGG16 normalisation (what keras.applications.vgg16.preprocess_input does): BGR order
# minus the ImageNet channel means. Grayscale is copied to all three channels, so the RGB->BGR flip
# is a no-op and only the per-channel means matter.
VGG16_MEAN_BGR = (103.939, 116.779, 123.68)
# The spread of ImageNet's pixels in 0..255 (torchvision's per-channel std 0.229, 0.224, 0.225
# times 255, averaged). A standardised image is given ImageNet's mean and this spread, so that
# VGG16 sees the contrast its filters were trained on, not a near-constant image at mean - 115.
IMAGENET_STD = 57.6
# offset and scale of each intensity method's output (ml.layers): the 0..255 range the rest of
# the model expects.
INTENSITY_OUTPUT = {
    "standardize": (sum(VGG16_MEAN_BGR) / 3, IMAGENET_STD),
    "equalize": (0.0, 255.0),
}
MIN_INPUT_SIZE = 32  # VGG16 has five 2x2 poolings.

BaseWeights = str | os.PathLike[str] | None


def build_classifier(
    class_names: Sequence[str],
    input_size: int = 224,
    base_weights: BaseWeights = "imagenet",
    dropout: float = 0.3,
    intensity: str = "none",
) -> keras.Model:
    """Build VGG16 (no top) plus a small softmax head over ``class_names``.

    The model takes ``(batch, input_size, input_size, 1)`` float32 grayscale in 0..255 (what
    :func:`ml.imaging.to_model_input` returns) and does the rest of the preprocessing in its graph
    (the intensity normalisation if any, grayscale to three channels, VGG16 normalisation), so
    training and serving cannot disagree.

    Args:
        class_names: Output classes in order, e.g. ``["NORMAL", "PNEUMONIA"]``.
        input_size: Side of the square input in pixels (at least 32).
        base_weights: ``"imagenet"``, a path to a local VGG16 notop weights file, or ``None``.
        dropout: Dropout rate before the output layer.
        intensity: ``"none"`` (no layer), ``"standardize"`` or ``"equalize"``: an
            :class:`ml.layers.IntensityNormalization` right after the input, its output mapped
            back to the 0..255 scale (``INTENSITY_OUTPUT``).
    """
    if len(class_names) < 2 or len(set(class_names)) != len(class_names):
        raise ValueError(f"need at least two distinct class names, got {list(class_names)}")
    if input_size < MIN_INPUT_SIZE:
        raise ValueError(f"input_size must be at least {MIN_INPUT_SIZE}, got {input_size}")
    weights = os.fspath(base_weights) if base_weights is not None else None
    if weights is not None and weights != "imagenet" and not os.path.isfile(weights):
        raise FileNotFoundError(f"VGG16 weights file not found: {weights}")

    if intensity not in INTENSITIES:
        raise ValueError(f"intensity must be one of {', '.join(INTENSITIES)}, got {intensity!r}")

    inputs = keras.Input(shape=(input_size, input_size, 1), name="image")
    x = inputs
    if intensity != "none":
        offset, scale = INTENSITY_OUTPUT[intensity]
        x = IntensityNormalization(intensity, offset=offset, scale=scale, name=INTENSITY_LAYER)(x)
    x = keras.layers.Concatenate(name="gray_to_rgb")([x, x, x])
    x = keras.layers.Normalization(
        mean=VGG16_MEAN_BGR, variance=(1.0, 1.0, 1.0), name="vgg16_preprocess"
    )(x)
    base = keras.applications.VGG16(
        include_top=False, weights=weights, input_shape=(input_size, input_size, 3)
    )
    base.trainable = False
    # training=False keeps the base in inference mode even while the head trains or is unfrozen.
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(len(class_names), activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="cxr_vgg16")


def build_standin_classifier(class_names: Sequence[str], input_size: int = 224) -> keras.Model:
    """A model that costs almost nothing (one pooling, one dense layer) with the same interface.

    For measuring the serving pipeline itself: it goes through the same registry, worker and
    batching code as the VGG16 classifier.
    """
    inputs = keras.Input(shape=(input_size, input_size, 1), name="image")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(inputs)
    outputs = keras.layers.Dense(len(class_names), activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="cxr_standin")


@dataclass(frozen=True)
class Prediction:
    """One classified image: the winning label and the probability of every class."""

    label: str
    probabilities: dict[str, float]


class Classifier:
    """A loaded model with its class names, called through one compiled function.

    ``model.predict`` per request is several times slower than a compiled call on small batches,
    so the model is wrapped once in a ``tf.function`` whose batch dimension is left open.
    """

    def __init__(
        self,
        model: keras.Model,
        class_names: Sequence[str],
        version: int | None = None,
        decision_threshold: float | None = None,
        gate: MahalanobisGate | None = None,
        trained: bool = True,
    ):
        shape = model.input_shape
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 1:
            raise ValueError(f"model input must be (batch, size, size, 1), got {shape}")
        if model.output_shape[-1] != len(class_names):
            raise ValueError(
                f"model has {model.output_shape[-1]} outputs but {len(class_names)} class names"
            )
        self.model = model
        self.class_names = list(class_names)
        self.input_size = int(shape[1])
        self.version = version
        self.decision_threshold = decision_threshold
        # False: a version never fine-tuned (ml.versions.ModelMetadata.trained); its answers
        # carry the mark.
        self.trained = trained
        self.precision = model_precision(model)
        self._negative = negative_index(self.class_names)
        self.gate = gate
        # With a gate the compiled call also returns the pooled features: one forward pass
        # gives both the probabilities and what the gate scores (ml.ood).
        net = feature_model(model, gate.layer) if gate is not None else model
        self._call = tf.function(
            lambda x: net(x, training=False),
            input_signature=[
                tf.TensorSpec((None, self.input_size, self.input_size, 1), tf.float32)
            ],
        )
        # Grad-CAM of the same layers (ml.explain); None with the reason for a model without
        # a convolutional layer (the stand-in).
        # With a gate its forward pass also gives the gate's pooled features (one pass).
        self.explainer, self.explainer_error = build_explainer(
            model, self.class_names, gate.layer if gate is not None else None
        )

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        """Return class probabilities ``(n, classes)`` for ``(n, size, size, 1)`` float32 input."""
        return self.predict_scored(images)[0]

    def predict_scored(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities and, with a gate, each image's OOD score (else ``None``)."""
        out: Any = self._call(tf.convert_to_tensor(images, dtype=tf.float32))
        if self.gate is None:
            return np.asarray(out, dtype=np.float64), None
        probs, features = out
        scores = self.gate.score(np.asarray(features, dtype=np.float32))
        return np.asarray(probs, dtype=np.float64), scores

    def to_prediction(self, probabilities: np.ndarray) -> Prediction:
        """Turn one row of probabilities into a :class:`Prediction` (JSON-native floats).

        The label follows :func:`ml.decision.decide`: argmax, or the version's threshold.
        """
        probs = {name: float(p) for name, p in zip(self.class_names, probabilities, strict=True)}
        (index,) = decide(
            np.asarray(probabilities)[None, :], self._negative, self.decision_threshold
        )
        return Prediction(label=self.class_names[index], probabilities=probs)

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run the compiled calls once per batch size so no real request pays for the first one.

        The first call of a new batch size builds that shape's kernels (oneDNN primitives; on a
        CPU with AMX ~0.4 s for VGG16 at 224 px, several times a steady call): a worker that pads
        its batches to a few sizes (``worker.batcher``) warms each of them here.
        """
        for n in batch_sizes:
            x = np.zeros((n, self.input_size, self.input_size, 1), np.float32)
            self.predict_batch(x)
            if self.explainer is not None:
                self.explainer.explain(x)
