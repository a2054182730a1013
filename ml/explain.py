"""Grad-CAM (Selvaraju et al. 2017): which parts of the image drove the reported class.

For the last convolutional layer ``A`` (VGG16: ``block5_conv3``) and the score ``y_c`` of the
class the service reports (the logit before the softmax when the output layer is a softmax
``Dense``, else the output itself), the map is ``ReLU(sum_k alpha_k A_k)`` with
``alpha_k = mean_ij dy_c/dA_k[i, j]``, divided by its maximum: float32 in [0, 1] at the conv
layer's resolution (14 x 14 for VGG16 at 224 px).

The model is split at that layer into ``features`` (input -> A) and ``head`` (A -> score,
probabilities) that share the served model's layers, weights and precision policy. One batch
then costs one forward pass (``forward``: probabilities and A, the same numbers the whole model
gives; with an out-of-distribution gate also its pooled features, ``ml.ood``) and one gradient
pass of the head over the whole batch (``maps``: the class of each image gathered), never a
second pass through the base: dy/dA depends only on the layers after A.

TensorFlow/Keras module (workers and tests only); rendering an overlay is ``ml.overlay``'s job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from ml.decision import decide, negative_index

if TYPE_CHECKING:
    from ml.model import Classifier

__all__ = [
    "METHOD",
    "BatchExplanations",
    "GradCam",
    "Heatmap",
    "NoConvLayerError",
    "build_explainer",
    "last_conv_layer",
    "map_to_json",
    "predict_and_explain",
]

log = logging.getLogger(__name__)

METHOD = "grad-cam"


class NoConvLayerError(ValueError):
    """The model has no convolutional layer, so it has no Grad-CAM (e.g. the stand-in model)."""


@dataclass(frozen=True)
class Heatmap:
    """One image's Grad-CAM map and what it explains."""

    values: npt.NDArray[np.float32]  # (h, w) in [0, 1], at the conv layer's resolution
    layer: str
    class_index: int
    class_name: str


def _walk(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer of ``model`` in order, nested models' layers in place of the nested model."""
    found: list[keras.layers.Layer] = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(_walk(layer))
        else:
            found.append(layer)
    return found


def last_conv_layer(model: keras.Model) -> keras.layers.Layer:
    """The last 2-D convolution of ``model``, nested models included (VGG16: ``block5_conv3``).

    Raises:
        NoConvLayerError: the model has none.
    """
    convs = [layer for layer in _walk(model) if isinstance(layer, keras.layers.Conv2D)]
    if not convs:
        raise NoConvLayerError(
            f"model {model.name!r} has no convolutional layer: Grad-CAM does not apply to it"
        )
    return convs[-1]


def _split(
    model: keras.Model, target: keras.layers.Layer, pooled: keras.layers.Layer | None = None
) -> tuple[keras.Model, keras.Model, keras.layers.Layer]:
    """``features`` (input -> A) and ``head`` (A -> [output layer's input, output(, pooled)]).

    With ``pooled`` (the OOD gate's feature layer, after A) the head has a third output: that
    layer's output, so the gate's features come from the same forward pass.

    The graph is rebuilt with nested models inlined, every layer reused (so weights and dtype
    policies are the served model's), which puts A and the output in one graph; Keras 3 builds
    a model between any two of its tensors.
    """
    output_layer = model.layers[-1]
    captured: dict[str, Any] = {}

    def inline(sub: keras.Model, inputs: Any) -> Any:
        def call(layer: keras.layers.Layer, *args: Any, **kwargs: Any) -> Any:
            if isinstance(layer, keras.Model):
                return inline(layer, args[0])
            out = layer(*args, **kwargs)
            if layer is target:
                captured["features"] = out
            if layer is output_layer:
                captured["pre_output"] = args[0]
            if pooled is not None and layer is pooled:
                captured["pooled"] = out
            return out

        # Function._run_through_graph is what clone_model itself calls; called directly it
        # builds on tensors of the enclosing graph (clone_model would make a nested model).
        outputs = sub._run_through_graph(inputs, operation_fn=lambda layer: layer, call_fn=call)
        return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs

    image = keras.Input(shape=model.input_shape[1:], name="image")
    output = inline(model, image)
    if "features" not in captured or "pre_output" not in captured:
        raise NoConvLayerError(f"could not locate {target.name!r} in the graph of {model.name!r}")
    if pooled is not None and "pooled" not in captured:
        raise NoConvLayerError(f"could not locate {pooled.name!r} in the graph of {model.name!r}")
    features = keras.Model(image, captured["features"], name="gradcam_features")
    outputs = [captured["pre_output"], output]
    if pooled is not None:
        outputs.append(captured["pooled"])
    head = keras.Model(captured["features"], outputs, name="gradcam_head")
    return features, head, output_layer


class GradCam:
    """Grad-CAM of one model, compiled once (open batch dimension: no retrace per batch size)."""

    def __init__(
        self, model: keras.Model, class_names: Sequence[str], pooled_layer: str | None = None
    ):
        self.class_names = list(class_names)
        target = last_conv_layer(model)
        self.layer = target.name
        # The OOD gate's feature layer (ml.ood): forward also returns its output.
        self.pooled_layer = pooled_layer
        pooled = model.get_layer(pooled_layer) if pooled_layer is not None else None
        features, head, output_layer = _split(model, target, pooled)
        size = int(model.input_shape[1])
        feature_shape = tuple(int(d) for d in features.output_shape[1:])
        self.map_shape: tuple[int, int] = (feature_shape[0], feature_shape[1])
        compute_dtype = tf.as_dtype(target.dtype_policy.compute_dtype)
        # Selvaraju et al. take y_c before the softmax: its gradient does not saturate as a
        # probability near 1 does.
        logits_from_dense = (
            isinstance(output_layer, keras.layers.Dense)
            and getattr(output_layer.activation, "__name__", "") == "softmax"
        )

        def forward(x: tf.Tensor) -> tuple[tf.Tensor, ...]:
            a = features(x, training=False)
            out = head(a, training=False)
            if pooled is None:
                return tf.cast(out[1], tf.float32), a
            return tf.cast(out[1], tf.float32), a, tf.cast(out[2], tf.float32)

        def maps(a: tf.Tensor, class_index: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                tape.watch(a)
                pre, probs = head(a, training=False)[:2]
                if logits_from_dense:
                    kernel = tf.convert_to_tensor(output_layer.kernel, tf.float32)
                    scores = tf.matmul(tf.cast(pre, tf.float32), kernel)
                    if output_layer.use_bias:
                        scores += tf.convert_to_tensor(output_layer.bias, tf.float32)
                else:
                    scores = tf.cast(probs, tf.float32)
                # One pass for the batch: each image's own class score, summed (images are
                # independent, so the sum's gradient is each image's gradient).
                chosen = tf.gather(scores, class_index, axis=1, batch_dims=1)
                total = tf.reduce_sum(chosen)
            grads = tape.gradient(total, a)
            # The weighted sum and the normalisation in float32: a bf16 sum of 512 channels
            # loses the small differences the map is made of.
            a32, g32 = tf.cast(a, tf.float32), tf.cast(grads, tf.float32)
            alpha = tf.reduce_mean(g32, axis=(1, 2), keepdims=True)
            cam = tf.nn.relu(tf.reduce_sum(alpha * a32, axis=-1))
            peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
            return tf.math.divide_no_nan(cam, peak)

        self._forward = tf.function(
            forward, input_signature=[tf.TensorSpec((None, size, size, 1), tf.float32)]
        )
        self._maps = tf.function(
            maps,
            input_signature=[
                tf.TensorSpec((None, *feature_shape), compute_dtype),
                tf.TensorSpec((None,), tf.int32),
            ],
        )
        self.input_size = size

    def forward(self, images: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float64], Any]:
        """Probabilities ``(n, classes)`` and the conv activations of ``(n, S, S, 1)`` input."""
        probs, features, _ = self.forward_pooled(images)
        return probs, features

    def forward_pooled(
        self, images: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float64], Any, npt.NDArray[np.float32] | None]:
        """:meth:`forward` plus the pooled features (``None`` without ``pooled_layer``)."""
        out = self._forward(tf.convert_to_tensor(images, dtype=tf.float32))
        pooled = np.asarray(out[2], dtype=np.float32) if len(out) == 3 else None
        return np.asarray(out[0], dtype=np.float64), out[1], pooled

    def maps(self, features: Any, class_index: Sequence[int]) -> npt.NDArray[np.float32]:
        """Maps ``(n, h, w)`` float32 in [0, 1] for activations from :meth:`forward`."""
        index = tf.convert_to_tensor(np.asarray(class_index, dtype=np.int32))
        return np.asarray(self._maps(features, index), dtype=np.float32)

    def explain(
        self, images: npt.NDArray[np.float32], class_index: Sequence[int] | None = None
    ) -> tuple[npt.NDArray[np.float64], list[Heatmap]]:
        """Probabilities and one :class:`Heatmap` per image (argmax class unless given)."""
        probs, features = self.forward(images)
        index = list(class_index) if class_index is not None else list(probs.argmax(axis=1))
        values = self.maps(features, index)
        return probs, [self.heatmap(v, int(i)) for v, i in zip(values, index, strict=True)]

    def heatmap(self, values: npt.NDArray[np.float32], class_index: int) -> Heatmap:
        """Wrap one map with its layer and class."""
        return Heatmap(values, self.layer, class_index, self.class_names[class_index])

    def warm_up(self) -> None:
        """Trace both compiled calls once."""
        self.explain(np.zeros((1, self.input_size, self.input_size, 1), np.float32))


def map_to_json(heatmap: Heatmap, decimals: int = 4) -> dict[str, Any]:
    """The JSON form stored in Redis and served as ``heatmap.json``."""
    return {
        "method": METHOD,
        "layer": heatmap.layer,
        "class_explained": heatmap.class_name,
        "shape": list(heatmap.values.shape),
        "values": np.round(heatmap.values.astype(np.float64), decimals).tolist(),
    }


def build_explainer(
    model: keras.Model, class_names: Sequence[str], pooled_layer: str | None = None
) -> tuple[GradCam | None, str]:
    """A :class:`GradCam` of ``model``, or ``None`` and the reason it has none.

    ``pooled_layer``: the OOD gate's feature layer, which its forward pass then also returns.
    """
    try:
        return GradCam(model, class_names, pooled_layer), ""
    except NoConvLayerError as exc:
        return None, str(exc)
    except Exception as exc:  # an architecture the split does not handle: serve without maps
        log.exception("no Grad-CAM for model %r", model.name)
        return None, f"Grad-CAM is not available for this model: {exc}"


@dataclass(frozen=True)
class BatchExplanations:
    """A batch's probabilities, OOD scores and, for the images that asked, their maps."""

    probabilities: npt.NDArray[np.float64]  # (n, classes)
    heatmaps: list[Heatmap | None]  # one per image; None: not asked, or see ``error``
    error: str | None  # why the images that asked have no map
    seconds: float | None  # the gradient pass; None when none ran
    ood_scores: npt.NDArray[np.float64] | None = None  # the gate's (ml.ood); None: no gate


def _scored(classifier: Classifier, images: npt.NDArray[np.float32]) -> tuple[Any, Any]:
    """Probabilities and OOD scores from the classifier's own call (``predict_scored``)."""
    scored = getattr(classifier, "predict_scored", None)
    if scored is None:  # a stand-in without a gate
        return classifier.predict_batch(images), None
    return scored(images)


def predict_and_explain(
    classifier: Classifier, images: npt.NDArray[np.float32], wanted: Sequence[bool]
) -> BatchExplanations:
    """Classify a batch and explain the reported class of each image in ``wanted``.

    Without any image asking (or a model without Grad-CAM) this is ``predict_scored``. Otherwise
    one :meth:`GradCam.forward_pooled` gives the probabilities (the same as the model's), the conv
    activations and, when the classifier has an OOD gate, the pooled features it scores (the
    explainer was built with the gate's layer: still one forward pass); the service's decision
    rule picks each image's class, and one :meth:`GradCam.maps` pass explains the images that
    asked. A failing map never fails the
    prediction: the probabilities stand and ``error`` says what went wrong.
    """
    n = len(images)
    explainer: GradCam | None = getattr(classifier, "explainer", None)
    if not any(wanted) or explainer is None:
        error = None if not any(wanted) else getattr(classifier, "explainer_error", "no Grad-CAM")
        probs, scores = _scored(classifier, images)
        return BatchExplanations(probs, [None] * n, error, None, scores)
    gate = getattr(classifier, "gate", None)
    try:
        probs, features, pooled = explainer.forward_pooled(images)
        if gate is not None and pooled is None:
            raise RuntimeError("the explainer was built without the gate's feature layer")
        scores = gate.score(pooled) if gate is not None else None
    except Exception as exc:
        log.exception("Grad-CAM forward pass failed; classifying without it")
        probs, scores = _scored(classifier, images)
        return BatchExplanations(probs, [None] * n, f"Grad-CAM failed: {exc}", None, scores)
    try:
        started = time.perf_counter()
        index = decide(probs, negative_index(classifier.class_names), classifier.decision_threshold)
        chosen = [i for i, w in enumerate(wanted) if w]
        picked = features if len(chosen) == n else tf.gather(features, chosen)
        values = explainer.maps(picked, [int(index[i]) for i in chosen])
        heatmaps: list[Heatmap | None] = [None] * n
        for i, v in zip(chosen, values, strict=True):
            heatmaps[i] = explainer.heatmap(v, int(index[i]))
        return BatchExplanations(probs, heatmaps, None, time.perf_counter() - started, scores)
    except Exception as exc:
        log.exception("Grad-CAM gradient pass failed; the predictions stand")
        return BatchExplanations(probs, [None] * n, f"Grad-CAM failed: {exc}", None, scores)
