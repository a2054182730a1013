"""The training recipe: two phases of ``model.fit`` on a loaded dataset, then the test split.

The recipe follows the keras-io transfer-learning guide: phase 1 trains the new head on a frozen
base, phase 2 unfreezes the last ``finetune_blocks`` VGG16 blocks and recompiles with a much
smaller learning rate. The model does its own preprocessing in its graph, so what was trained is
what is served. Augmentation runs in the ``tf.data`` input pipeline only and is never part of
the saved model.

TensorFlow is imported only inside the functions that need it. The knobs are
:class:`ml.config.TrainConfig`, the data :func:`ml.dataset.load_dataset`; the local command line
is ``python -m cli.train``.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ml.augment import build_augmenter
from ml.calibration import choose_threshold
from ml.config import VGG16_BLOCKS, TrainConfig
from ml.dataset import Dataset
from ml.decision import NEGATIVE_CLASS, negative_index
from ml.evaluation import evaluate_model, plot_curves
from ml.ood import MahalanobisGate, fit_gate
from ml.progress import BatchReport, EpochReport, Progress

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

__all__ = ["TrainResult", "balanced_class_weights", "set_trainable_blocks", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train` produced.

    ``model`` is an uncompiled copy of the trained network (no optimizer state, so a saved
    version is the size of its weights and loads without this module). ``history`` has one row
    per epoch: ``{"phase", "epoch", "loss", "accuracy", "auc", "val_loss", "val_accuracy",
    "val_auc"}``; ``evaluation`` is :func:`ml.evaluation.evaluate_predictions` on the test split,
    at ``decision_threshold`` (chosen on the val split for ``config.target_sensitivity``; None =
    argmax).
    """

    model: keras.Model
    history: list[dict[str, Any]]
    evaluation: dict[str, Any]
    curves_png: bytes
    seconds: float
    dataset: Dataset
    config: TrainConfig
    decision_threshold: float | None = None
    precision: str = "float32"
    """What the training steps computed in (``model`` itself is float32, like every version)."""
    ood_gate: MahalanobisGate | None = None
    """The out-of-distribution gate fitted on the train split, thresholded on val (ml.ood)."""
    ood: dict[str, Any] = field(default_factory=dict)
    """The gate's summary for the version's metadata."""


@functools.cache
def _disease_auc_class() -> type[Any]:
    """The Keras metric class "ROC AUC of any disease vs the negative class" (built once)."""
    import keras

    class DiseaseAUC(keras.metrics.AUC):
        """Binary ROC AUC over softmax outputs: label = not negative, score = 1 - p(negative).

        This is the same quantity as ``evaluate_predictions(...)["roc_auc"]`` (up to Keras's
        threshold approximation) and works unchanged for two or more classes.
        """

        def __init__(self, negative_index: int = 0, name: str = "auc", **kwargs: Any) -> None:
            kwargs.setdefault("num_thresholds", 1000)
            super().__init__(name=name, **kwargs)
            self.negative_index = int(negative_index)

        def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
            ops = keras.ops
            labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
            positive = ops.cast(ops.not_equal(labels, self.negative_index), "float32")
            score = 1.0 - y_pred[:, self.negative_index]
            return super().update_state(positive, score, sample_weight)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "negative_index": self.negative_index}

    return DiseaseAUC


def balanced_class_weights(y: npt.NDArray[np.integer[Any]], n_classes: int) -> dict[int, float]:
    """``n / (k * count_c)`` per class, as scikit-learn's ``class_weight="balanced"``."""
    counts = np.bincount(y, minlength=n_classes)
    return {
        c: float(len(y) / (n_classes * counts[c])) if counts[c] else 0.0 for c in range(n_classes)
    }


def _input_pipelines(
    config: TrainConfig, dataset: Dataset
) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """Batched training (shuffled, augmented if configured) and validation ``tf.data`` sets."""
    import tensorflow as tf

    train_ds = tf.data.Dataset.from_tensor_slices((dataset.x_train, dataset.y_train))
    train_ds = train_ds.shuffle(
        len(dataset.y_train), seed=config.seed, reshuffle_each_iteration=True
    )
    train_ds = train_ds.batch(config.batch_size)
    augment = build_augmenter(config.seed, light=config.augment, sites=config.site_augment)
    if augment is not None:
        # Sequential map (no num_parallel_calls): the random layers draw from one seeded
        # generator, and a parallel map would hand out its draws in a varying order.
        train_ds = train_ds.map(lambda x, y: (augment(x), y))
    train_ds = train_ds.prefetch(tf.data.AUTOTUNE)
    val_ds = tf.data.Dataset.from_tensor_slices((dataset.x_val, dataset.y_val))
    val_ds = val_ds.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)
    return train_ds, val_ds


def set_trainable_blocks(model: keras.Model, blocks: int) -> None:
    """Freeze the VGG16 base except its last ``blocks`` conv blocks (0 = all frozen).

    ``blocks=1`` unfreezes ``block5_*``, ``2`` unfreezes ``block4_*`` and ``block5_*``, and so on
    up to ``5`` (the whole base). The head stays trainable. Recompile afterwards: Keras fixes the
    set of trained weights when a model is compiled.
    """
    if not 0 <= blocks <= VGG16_BLOCKS:
        raise ValueError(f"blocks must be between 0 and {VGG16_BLOCKS}, got {blocks}")
    base = model.get_layer("vgg16")
    prefixes = tuple(f"block{b}_" for b in range(VGG16_BLOCKS - blocks + 1, VGG16_BLOCKS + 1))
    base.trainable = blocks > 0
    for layer in base.layers:
        layer.trainable = blocks > 0 and layer.name.startswith(prefixes)


def _compile(model: keras.Model, learning_rate: float, negative: int) -> None:
    """Compile with Adam, sparse categorical cross-entropy, accuracy and the disease AUC."""
    import keras

    from ml.precision import model_precision

    optimizer: Any = keras.optimizers.Adam(learning_rate)
    if model_precision(model) == "float16":
        # float16 gradients underflow without loss scaling (bfloat16 has float32's range).
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy", _disease_auc_class()(negative_index=negative, name="auc")],
    )


def _copy_model(model: keras.Model) -> keras.Model:
    """An uncompiled copy of ``model`` with the same architecture, weights and trainable flags."""
    import keras

    # Rebuilt from the architecture config rather than keras.models.clone_model, which would
    # also recompile the copy (optimizer and our custom metric included).
    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def _check_inputs(config: TrainConfig, dataset: Dataset, base_model: keras.Model | None) -> None:
    """Raise ValueError when the dataset or the model to continue cannot be trained as asked."""
    k = len(dataset.class_names)
    for split in ("train", "val", "test"):
        x = getattr(dataset, f"x_{split}")
        y = getattr(dataset, f"y_{split}")
        if x.shape[1:] != (config.input_size, config.input_size, 1):
            raise ValueError(
                f"x_{split} has images of shape {x.shape[1:]}, but config.input_size is "
                f"{config.input_size}: load the dataset with the same config"
            )
        if len(x) != len(y) or len(y) == 0:
            raise ValueError(f"the {split} split is empty or its images and labels differ")
        if y.min() < 0 or y.max() >= k:
            raise ValueError(f"y_{split} has labels outside 0..{k - 1}")
    if base_model is not None:
        if base_model.output_shape[-1] != k:
            raise ValueError(
                f"the model to continue has {base_model.output_shape[-1]} outputs but the "
                f"dataset has {k} classes {dataset.class_names}"
            )
        if tuple(base_model.input_shape[1:]) != (config.input_size, config.input_size, 1):
            raise ValueError(
                f"the model to continue takes {base_model.input_shape[1:]} input, but "
                f"config.input_size is {config.input_size}"
            )
        if "vgg16" not in {layer.name for layer in base_model.layers}:
            raise ValueError("the model to continue has no nested 'vgg16' base")
        from ml.layers import intensity_of

        if intensity_of(base_model) != config.intensity:
            raise ValueError(
                f"the model to continue normalises intensity with {intensity_of(base_model)!r}, "
                f"but config.intensity is {config.intensity!r}"
            )


def train(
    config: TrainConfig,
    dataset: Dataset,
    *,
    base_model: keras.Model | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    on_batch: Callable[[BatchReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    precision: str = "float32",
) -> TrainResult:
    """Train (phase 1: head; phase 2: last VGG16 blocks), then evaluate on the test split.

    Args:
        config: The run's settings; ``config.input_size`` must match the dataset's images.
        dataset: From :func:`load_dataset` with the same config.
        base_model: Continue from this classifier (its architecture and weights; it is copied,
            not modified) instead of building a new one from ``config.base_weights``.
        on_epoch: Called after every epoch with an :class:`EpochReport`.
        on_batch: Called during epochs with a :class:`BatchReport`: after the first training
            batch, then at most every ``BATCH_REPORT_SECONDS``.
        should_stop: Polled after every training batch; returning True raises
            :class:`TrainingCancelled`.
        precision: What the training steps compute in (``auto``: what the hardware runs
            fastest, :func:`ml.precision.choose_precision`). The returned model, the threshold
            choice and the evaluation are float32 whatever it is.

    Early stopping watches ``val_auc`` per phase and restores the best epoch's weights. The
    same seed and data give the same weights.
    """
    import keras

    from ml.model import build_classifier
    from ml.precision import choose_precision, detect_hardware, with_precision

    started = time.monotonic()
    _check_inputs(config, dataset, base_model)
    keras.utils.set_random_seed(config.seed)
    if base_model is not None:
        model = _copy_model(base_model)
    else:
        model = build_classifier(
            dataset.class_names,
            config.input_size,
            config.base_weights,
            intensity=config.intensity,
        )
    precision = choose_precision(precision, detect_hardware())
    model = with_precision(model, precision)
    log.info("training in %s", precision)
    negative = negative_index(dataset.class_names, NEGATIVE_CLASS)
    class_weight = balanced_class_weights(dataset.y_train, len(dataset.class_names))
    train_ds, val_ds = _input_pipelines(config, dataset)
    batches = math.ceil(len(dataset.y_train) / config.batch_size)
    progress = Progress(config, started, batches, on_epoch, on_batch, should_stop)

    phases = [
        (1, config.planned_epochs(1), config.learning_rate_head, 0),
        (2, config.planned_epochs(2), config.learning_rate_finetune, config.finetune_blocks),
    ]
    for phase, epochs, learning_rate, blocks in phases:
        if epochs == 0:
            continue
        progress.check_stop()
        progress.start_phase(phase)
        set_trainable_blocks(model, blocks)
        _compile(model, learning_rate, negative)
        log.info(
            "phase %d: %d epoch(s), %d VGG16 block(s) trainable, learning rate %g, "
            "%d trainable weights",
            phase,
            epochs,
            blocks,
            learning_rate,
            sum(int(np.prod(w.shape)) for w in model.trainable_weights),
        )
        stopper = keras.callbacks.EarlyStopping(
            monitor="val_auc", mode="max", patience=config.patience, restore_best_weights=True
        )
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=epochs,
            class_weight=class_weight,
            callbacks=[progress.callback(model), stopper],
            shuffle=False,  # train_ds shuffles itself (seeded); Keras cannot shuffle a tf.data set
            verbose=0,
        )
        if stopper.stopped_epoch > 0:
            log.info(
                "phase %d stopped early after %d epoch(s); kept the weights of phase epoch %d",
                phase,
                stopper.stopped_epoch + 1,
                stopper.best_epoch + 1,
            )

    final = with_precision(_copy_model(model), "float32")
    threshold = None
    if config.target_sensitivity is not None:
        threshold = choose_threshold(final, dataset, config.target_sensitivity, config.batch_size)
    evaluation = evaluate_model(
        final, dataset.x_test, dataset.y_test, dataset.class_names, config.batch_size, threshold
    )
    gate, ood = fit_gate(final, dataset, batch_size=config.batch_size)
    return TrainResult(
        model=final,
        history=progress.history,
        evaluation=evaluation,
        curves_png=plot_curves(progress.history),
        seconds=time.monotonic() - started,
        dataset=dataset,
        config=config,
        decision_threshold=threshold,
        precision=precision,
        ood_gate=gate,
        ood=ood,
    )


if __name__ == "__main__":  # the older spelling of `python -m cli.train`, kept as an alias
    from cli.train import main

    sys.exit(main())
