"""Unit tests for ml.model on tiny (32 px) VGG16 classifiers built without pretrained weights."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import keras
import numpy as np
import numpy.typing as npt
import pytest

from ml.model import MIN_INPUT_SIZE, Classifier, Prediction, build_classifier

SIZE = 32
TWO = ["NORMAL", "PNEUMONIA"]
THREE = ["NORMAL", "PNEUMONIA", "COVID19"]


def gray_batch(n: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """Random grayscale model input of shape (n, SIZE, SIZE, 1) in 0..255."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, SIZE, SIZE, 1)).astype(np.float32)


def vgg16_base(model: keras.Model) -> keras.Model:
    """The VGG16 sub-model nested inside a classifier."""
    return model.get_layer("vgg16")


@pytest.fixture(scope="module")
def model2() -> keras.Model:
    """An untrained two-class classifier."""
    keras.utils.set_random_seed(0)
    return build_classifier(TWO, input_size=SIZE, base_weights=None)


@pytest.fixture(scope="module")
def model3() -> keras.Model:
    """An untrained three-class classifier."""
    keras.utils.set_random_seed(1)
    return build_classifier(THREE, input_size=SIZE, base_weights=None)


@pytest.fixture(scope="module")
def classifier2(model2: keras.Model) -> Classifier:
    """The two-class model wrapped for inference."""
    return Classifier(model2, TWO, version=7)


@pytest.mark.parametrize(("fixture", "names"), [("model2", TWO), ("model3", THREE)])
def test_output_shape_and_probabilities(
    fixture: str, names: list[str], request: pytest.FixtureRequest
) -> None:
    model: keras.Model = request.getfixturevalue(fixture)
    assert model.input_shape == (None, SIZE, SIZE, 1)
    assert model.output_shape == (None, len(names))
    probs = Classifier(model, names).predict_batch(gray_batch(4))
    assert isinstance(probs, np.ndarray)
    assert probs.dtype == np.float64
    assert probs.shape == (4, len(names))
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("names", [[], ["NORMAL"], ["NORMAL", "NORMAL"], ["A", "B", "A"]], ids=repr)
def test_refuses_bad_class_names(names: list[str]) -> None:
    with pytest.raises(ValueError, match="two distinct class names"):
        build_classifier(names, input_size=SIZE, base_weights=None)


@pytest.mark.parametrize("size", [0, 16, MIN_INPUT_SIZE - 1])
def test_refuses_small_input(size: int) -> None:
    with pytest.raises(ValueError, match="input_size"):
        build_classifier(TWO, input_size=size, base_weights=None)


def test_refuses_missing_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(FileNotFoundError, match="nope.weights.h5"):
        build_classifier(TWO, input_size=SIZE, base_weights=missing)
    with pytest.raises(FileNotFoundError):
        build_classifier(TWO, input_size=SIZE, base_weights=str(tmp_path))  # a folder


def test_local_weights_file_is_loaded_into_the_base(tmp_path: Path) -> None:
    keras.utils.set_random_seed(42)
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    path = tmp_path / "w.weights.h5"
    source.save_weights(path)
    expected = source.get_weights()

    keras.utils.set_random_seed(43)  # a different seed: equal weights can only come from the file
    model = build_classifier(TWO, input_size=SIZE, base_weights=path)
    actual = vgg16_base(model).get_weights()
    assert len(actual) == len(expected) == 26
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, e)


def test_preprocessing_is_in_the_graph(model2: keras.Model) -> None:
    x = gray_batch(3, seed=5)
    original = x.copy()
    front = keras.Model(model2.input, model2.get_layer("vgg16_preprocess").output)
    got = np.asarray(front(x, training=False))
    expected = keras.applications.vgg16.preprocess_input(np.repeat(x, 3, axis=-1).copy())
    assert got.shape == (3, SIZE, SIZE, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(x, original)  # the caller's array is not written to


def test_classifier_does_not_modify_its_input(classifier2: Classifier) -> None:
    x = gray_batch(2, seed=6)
    original = x.copy()
    classifier2.predict_batch(x)
    np.testing.assert_array_equal(x, original)


def test_base_frozen_head_trainable(model2: keras.Model) -> None:
    base = vgg16_base(model2)
    assert base.trainable is False
    assert base.trainable_weights == []
    head = model2.get_layer("predictions")
    assert head.trainable is True
    trainable = {id(w) for w in model2.trainable_weights}
    assert trainable == {id(w) for w in head.trainable_weights}
    assert len(trainable) == 2  # the Dense kernel and bias


def test_classifier_refuses_mismatched_class_names(model2: keras.Model) -> None:
    with pytest.raises(ValueError, match="2 outputs but 3 class names"):
        Classifier(model2, THREE)
    with pytest.raises(ValueError, match="2 outputs but 1 class names"):
        Classifier(model2, ["NORMAL"])


def test_classifier_refuses_non_grayscale_input() -> None:
    inputs = keras.Input(shape=(SIZE, SIZE, 3))
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(inputs))
    with pytest.raises(ValueError, match="size, size, 1"):
        Classifier(keras.Model(inputs, outputs), TWO)


def test_classifier_attributes(classifier2: Classifier) -> None:
    assert classifier2.class_names == TWO
    assert classifier2.input_size == SIZE
    assert classifier2.version == 7


def test_to_prediction_is_json_native(classifier2: Classifier) -> None:
    row = np.array([0.25, 0.75], dtype=np.float32)
    prediction = classifier2.to_prediction(row)
    assert isinstance(prediction, Prediction)
    assert prediction.label == "PNEUMONIA"
    assert list(prediction.probabilities) == TWO
    assert all(type(v) is float for v in prediction.probabilities.values())
    assert prediction.probabilities == {"NORMAL": 0.25, "PNEUMONIA": 0.75}
    assert json.loads(json.dumps(asdict(prediction))) == asdict(prediction)


def test_to_prediction_at_a_decision_threshold(model2: keras.Model, model3: keras.Model) -> None:
    """With a threshold on 1 - p(NORMAL), a finding is called below p = 0.5."""
    screening = Classifier(model2, TWO, decision_threshold=0.3)
    assert screening.to_prediction(np.array([0.65, 0.35])).label == "PNEUMONIA"
    assert screening.to_prediction(np.array([0.75, 0.25])).label == "NORMAL"
    assert Classifier(model2, TWO).to_prediction(np.array([0.65, 0.35])).label == "NORMAL"
    # Three classes: a called finding is the most probable disease, even if NORMAL is higher.
    three = Classifier(model3, THREE, decision_threshold=0.4)
    assert three.to_prediction(np.array([0.55, 0.30, 0.15])).label == "PNEUMONIA"
    assert three.to_prediction(np.array([0.65, 0.15, 0.20])).label == "NORMAL"


def test_to_prediction_label_is_argmax(model3: keras.Model) -> None:
    classifier = Classifier(model3, THREE)
    probs = classifier.predict_batch(gray_batch(6, seed=2))
    for row in probs:
        prediction = classifier.to_prediction(row)
        assert prediction.label == THREE[int(np.argmax(row))]
        assert all(type(v) is float for v in prediction.probabilities.values())
        json.dumps({"label": prediction.label, "probabilities": prediction.probabilities})
    # A row of numpy float32 values, as a model returns them, is converted too.
    prediction = classifier.to_prediction(np.array([0.1, 0.2, 0.7], dtype=np.float32))
    assert prediction.label == "COVID19"
    assert all(type(v) is float for v in prediction.probabilities.values())


def test_to_prediction_refuses_wrong_length(classifier2: Classifier) -> None:
    with pytest.raises(ValueError):
        classifier2.to_prediction(np.array([0.2, 0.3, 0.5]))


def test_warm_up_and_varying_batch_sizes(classifier2: Classifier) -> None:
    classifier2.warm_up()
    x = gray_batch(5, seed=3)
    batch = classifier2.predict_batch(x)
    one = classifier2.predict_batch(x[:1])
    assert batch.shape == (5, 2)
    assert one.shape == (1, 2)
    np.testing.assert_allclose(one[0], batch[0], rtol=1e-5, atol=1e-6)
    # The compiled function has one trace for every batch size (its batch dimension is open).
    assert classifier2._call.experimental_get_tracing_count() == 1
    # float64 / uint8-valued input is accepted and cast, without a new trace.
    classifier2.predict_batch(x.astype(np.float64))
    assert classifier2._call.experimental_get_tracing_count() == 1


def test_inference_is_deterministic(classifier2: Classifier) -> None:
    x = gray_batch(3, seed=4)
    np.testing.assert_array_equal(classifier2.predict_batch(x), classifier2.predict_batch(x))
