"""The intensity normalisation layer (ml.layers) and the classifier holding it (32 px, no weights).

What it computes (standardize: mean 0 and std 1 per image; equalize: a flat histogram, monotone
in the input, blind to a change of contrast), and that it survives everything that rebuilds or
splits a model: saving and loading, ``with_precision`` (bfloat16), the compiled serving call,
Grad-CAM and the OOD gate's feature model.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import numpy.typing as npt
import pytest
import tensorflow as tf

from ml.explain import predict_and_explain
from ml.layers import INTENSITY_LAYER, IntensityNormalization, intensity_of
from ml.model import INTENSITY_OUTPUT, Classifier, build_classifier
from ml.ood import MahalanobisGate, feature_model
from ml.precision import model_precision, with_precision
from ml.versions import load_classifier, save_version

SIZE = 32
TWO = ["NORMAL", "PNEUMONIA"]
METHODS = ("standardize", "equalize")
ROOT = Path(__file__).resolve().parents[2]


def films(n: int, seed: int = 0, side: int = SIZE) -> npt.NDArray[np.float32]:
    """Smooth fake films in 0..255 with a different brightness and contrast each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side] / side
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)
        image = rng.uniform(40, 120) + rng.uniform(60, 120) * blob + 40 * xx
        image += rng.normal(0, 4, image.shape)
        out.append(np.clip(image, 0, 255))
    return np.stack(out).astype(np.float32)[..., None]


def run(layer: keras.layers.Layer, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    return np.asarray(layer(tf.constant(x)), dtype=np.float64)


def test_standardize_gives_each_image_mean_0_and_std_1() -> None:
    x = films(4)
    y = run(IntensityNormalization("standardize"), x)
    np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=(1, 2, 3)), 1, atol=1e-4)
    # Per image: an image's output does not depend on the rest of the batch.
    np.testing.assert_allclose(run(IntensityNormalization("standardize"), x[1:2]), y[1:2])


def test_standardize_floors_the_std_of_a_flat_image() -> None:
    flat = np.full((1, SIZE, SIZE, 1), 90.0, np.float32)
    flat[0, 0, 0, 0] = 90.5  # std ~0.016 grey levels: noise, not contrast
    y = run(IntensityNormalization("standardize", min_std=1.0), flat)
    assert np.isfinite(y).all() and np.abs(y).max() < 0.5


def test_equalize_flattens_the_histogram_from_black_to_white() -> None:
    x = films(3, side=64)
    y = run(IntensityNormalization("equalize"), x)
    for image in y:
        assert image.min() == 0 and image.max() == pytest.approx(1)
        # Roughly: an image has ~100 grey levels, and a level's pixels stay together.
        share = np.histogram(image, bins=8, range=(0, 1))[0] / image.size
        np.testing.assert_allclose(share, 1 / 8, atol=0.035)
        assert image.std() == pytest.approx(np.sqrt(1 / 12), abs=0.01)  # a uniform's


def test_equalize_is_monotone_in_the_input() -> None:
    x = films(1)
    y = run(IntensityNormalization("equalize"), x)
    order = np.argsort(x.ravel(), kind="stable")
    assert np.all(np.diff(y.ravel()[order]) >= 0)


@pytest.mark.parametrize(
    "change",
    [
        lambda x: 0.55 * x + 40,  # flatter and brighter
        lambda x: 255 * (x / 255) ** 1.6,  # another gamma
        lambda x: np.clip(1.3 * (x - x.mean()) + x.mean(), 0, 255),  # more contrast
    ],
    ids=["contrast-brightness", "gamma", "stretch"],
)
def test_equalize_maps_a_contrast_changed_copy_to_nearly_the_same_image(change: object) -> None:
    x = films(2, side=64)
    changed = np.stack([change(image) for image in x]).astype(np.float32)  # type: ignore[operator]
    layer = IntensityNormalization("equalize")
    difference = np.abs(run(layer, x) - run(layer, changed))
    # Not exactly the same: the changed copy's levels fall into other bins (and the stretch
    # clips a few). On average under 4 of 255 grey levels, nowhere more than 20.
    assert difference.mean() < 0.015 and difference.max() < 0.08, difference.mean()


def test_the_layers_config_round_trips_and_names_a_registered_class() -> None:
    layer = IntensityNormalization("equalize", offset=3.0, scale=200.0, min_std=2.0, name="n")
    config = layer.get_config()
    assert IntensityNormalization.from_config(config).get_config() == config
    serialised = keras.saving.serialize_keras_object(layer)
    assert serialised["registered_name"] == "cxr>IntensityNormalization"
    again = keras.saving.deserialize_keras_object(serialised)
    assert isinstance(again, IntensityNormalization) and again.get_config() == config
    with pytest.raises(ValueError, match="method"):
        IntensityNormalization("none")


@pytest.fixture(scope="module", params=METHODS)
def model(request: pytest.FixtureRequest) -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_classifier(TWO, input_size=SIZE, base_weights=None, intensity=request.param)


def test_the_layer_comes_right_after_the_input_and_maps_to_0_255(model: keras.Model) -> None:
    names = [layer.name for layer in model.layers]
    assert names[:3] == ["image", INTENSITY_LAYER, "gray_to_rgb"]
    layer = model.get_layer(INTENSITY_LAYER)
    method = intensity_of(model)
    assert (layer.offset, layer.scale) == INTENSITY_OUTPUT[method]
    y = run(layer, films(2))
    assert 0 <= y.mean() <= 255 and 30 < y.std() < 100  # an image's range, not 0 +- 1


def test_none_adds_no_layer_and_a_wrong_name_is_refused() -> None:
    plain = build_classifier(TWO, input_size=SIZE, base_weights=None)
    assert intensity_of(plain) == "none"
    assert not any(isinstance(layer, IntensityNormalization) for layer in plain.layers)
    with pytest.raises(ValueError, match="intensity"):
        build_classifier(TWO, input_size=SIZE, base_weights=None, intensity="clahe")


def test_a_saved_version_loads_with_its_layer(model: keras.Model, tmp_path: Path) -> None:
    x = films(3)
    save_version(model, tmp_path, class_names=TWO, base_weights=None)
    loaded = load_classifier(tmp_path, 1)
    assert intensity_of(loaded.model) == intensity_of(model)
    np.testing.assert_allclose(
        loaded.predict_batch(x), Classifier(model, TWO).predict_batch(x), atol=1e-6
    )


def test_a_fresh_process_loads_the_layer_without_custom_objects(tmp_path: Path) -> None:
    model = build_classifier(TWO, input_size=SIZE, base_weights=None, intensity="equalize")
    save_version(model, tmp_path, class_names=TWO, base_weights=None)
    # A process that imports nothing of ml but the registry (as the trainer and the CLI do).
    code = (
        "import sys; from ml.versions import load_model; "
        "m = load_model(sys.argv[1], 1); print(type(m.get_layer('intensity')).__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "IntensityNormalization"


def test_bfloat16_keeps_the_layer_computing_in_float32(model: keras.Model) -> None:
    rebuilt = with_precision(model, "bfloat16")
    assert model_precision(rebuilt) == "bfloat16"
    layer = rebuilt.get_layer(INTENSITY_LAYER)
    assert isinstance(layer, IntensityNormalization)
    assert layer.get_config()["method"] == intensity_of(model)
    assert layer.dtype_policy.name == "mixed_bfloat16" and layer.input_dtype == "float32"
    # Its input is not rounded to bf16 first: the first output equals float32's up to the
    # final cast to bf16 (8 bits of mantissa).
    x = films(2)
    reference = run(model.get_layer(INTENSITY_LAYER), x)
    np.testing.assert_allclose(run(layer, x), reference, rtol=2**-8, atol=1e-6)
    for a, b in zip(model.get_weights(), rebuilt.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    back = with_precision(rebuilt, "float32")
    assert back.get_layer(INTENSITY_LAYER).dtype_policy.name == "float32"


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_serving_grad_cam_and_the_gate_work_with_the_layer(
    model: keras.Model, precision: str
) -> None:
    served = with_precision(model, precision)
    features = feature_model(served, "pool")
    width = int(features.outputs[1].shape[-1])
    gate = MahalanobisGate(
        np.zeros((2, width), np.float32), np.eye(width, dtype=np.float32), 1e12, 0.99, "pool"
    )
    classifier = Classifier(served, TWO, gate=gate)
    assert classifier.explainer is not None, classifier.explainer_error
    reference = Classifier(model, TWO)
    tolerance = 1e-5 if precision == "float32" else 0.05
    for n in (1, 3):  # the compiled call's open batch dimension
        x = films(n, seed=n)
        probs, scores = classifier.predict_scored(x)
        assert probs.shape == (n, 2) and scores is not None and scores.shape == (n,)
        np.testing.assert_allclose(probs, reference.predict_batch(x), atol=tolerance)
    x = films(3)
    explained = predict_and_explain(classifier, x, [True, False, True])
    assert explained.error is None, explained.error
    np.testing.assert_allclose(explained.probabilities, classifier.predict_batch(x), atol=1e-5)
    assert explained.ood_scores is not None and explained.heatmaps[1] is None
    for heatmap in (explained.heatmaps[0], explained.heatmaps[2]):
        assert heatmap is not None and heatmap.values.shape == classifier.explainer.map_shape
        assert np.isfinite(heatmap.values).all()
