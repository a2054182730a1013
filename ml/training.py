"""Training the VGG16 classifier on a folder of X-rays: dataset loading, the two-phase recipe, CLI.

The recipe follows the keras-io transfer-learning guide: phase 1 trains the new head on a frozen
base, phase 2 unfreezes the last ``finetune_blocks`` VGG16 blocks and recompiles with a much
smaller learning rate. Images go through :func:`ml.imaging.to_model_input`, the same resize the
service uses, and the model does the rest of its preprocessing in its own graph, so what was
trained is what is served. Augmentation runs in the ``tf.data`` input pipeline only and is never
part of the saved model.

TensorFlow is imported only inside the functions that need it, so TF-free processes can still use
:class:`TrainConfig`, :class:`DatasetError` and :func:`load_dataset`.

Run from the command line (writes ``model.keras``, ``evaluation.json``, ``history.json``,
``curves.png`` and ``run.json`` into ``--out``)::

    python -m ml.training --dataset DATA_DIR --out OUT_DIR --input-size 224
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ml.decision import NEGATIVE_CLASS, negative_index, threshold_for_sensitivity
from ml.evaluation import evaluate_predictions, plot_curves
from ml.imaging import ImageError, decode_image, to_model_input

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from ml.versions import ModelMetadata

__all__ = [
    "BatchReport",
    "Dataset",
    "DatasetError",
    "EpochReport",
    "TrainConfig",
    "TrainResult",
    "TrainingCancelled",
    "balanced_class_weights",
    "calibrate_version",
    "evaluate_model",
    "load_dataset",
    "main",
    "set_trainable_blocks",
    "train",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
VGG16_BLOCKS = 5
MAX_INPUT_SIZE = 1024
MIN_INPUT_SIZE = 32  # VGG16 halves the image five times (same limit as ml.model).
BATCH_REPORT_SECONDS = 2.0  # in-epoch progress: often enough to watch, rare enough to be free


class DatasetError(ValueError):
    """The dataset folder cannot be used for training; the message says what is wrong."""


class TrainingCancelled(Exception):
    """Training stopped because ``should_stop()`` returned True."""


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run. Values are checked on construction (``ValueError``)."""

    input_size: int = 224
    epochs_head: int = 5  # phase 1: head on a frozen base
    epochs_finetune: int = 5  # phase 2: the last `finetune_blocks` VGG16 blocks unfrozen
    learning_rate_head: float = 1e-3
    learning_rate_finetune: float = 1e-5
    finetune_blocks: int = 1  # 0..5; 0 skips phase 2; 5 = whole base trainable
    batch_size: int = 32
    seed: int = 1337
    augment: bool = True
    patience: int = 3  # early stopping on val AUC (best weights restored), per phase
    val_fraction: float = 0.15
    min_val_images: int = 50  # a smaller (or missing) val split -> stratified split off train
    max_images_per_class: int | None = None  # per split; for quick runs and tests
    base_weights: str | None = "imagenet"  # "imagenet", a weights-file path, or None
    # Label at the threshold reaching this sensitivity on the val split instead of at argmax.
    target_sensitivity: float | None = None

    def __post_init__(self) -> None:
        _check_int(self, "input_size", MIN_INPUT_SIZE, MAX_INPUT_SIZE)
        _check_int(self, "epochs_head", 0, 10_000)
        _check_int(self, "epochs_finetune", 0, 10_000)
        _check_float(self, "learning_rate_head", 0.0, 1.0)
        _check_float(self, "learning_rate_finetune", 0.0, 1.0)
        _check_int(self, "finetune_blocks", 0, VGG16_BLOCKS)
        _check_int(self, "batch_size", 1, 4096)
        _check_int(self, "seed", 0, 2**32 - 1)  # numpy's seed range
        if not isinstance(self.augment, bool):
            raise ValueError(f"augment must be true or false, got {self.augment!r}")
        _check_int(self, "patience", 1, 10_000)
        _check_float(self, "val_fraction", 0.0, 0.5)
        _check_int(self, "min_val_images", 0, 10**9)
        if self.max_images_per_class is not None:
            _check_int(self, "max_images_per_class", 1, 10**9)
        if self.target_sensitivity is not None:
            _check_float(self, "target_sensitivity", 0.0, 1.0)
        if self.base_weights is not None and (
            not isinstance(self.base_weights, str) or not self.base_weights
        ):
            raise ValueError(
                "base_weights must be 'imagenet', a weights-file path or None, "
                f"got {self.base_weights!r}"
            )
        if self.planned_epochs(1) + self.planned_epochs(2) == 0:
            raise ValueError(
                "epochs_head is 0 and phase 2 is off (epochs_finetune or finetune_blocks is 0): "
                "nothing to train"
            )

    def planned_epochs(self, phase: int) -> int:
        """The epochs planned for ``phase`` (1 or 2); phase 2 is off when it unfreezes nothing."""
        if phase == 1:
            return self.epochs_head
        return self.epochs_finetune if self.finetune_blocks > 0 else 0

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-native form, accepted back by :meth:`from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build a config from a dict; unknown keys and out-of-range values raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**data)


def _check_int(config: TrainConfig, name: str, low: int, high: int) -> None:
    """Raise ValueError unless ``config.<name>`` is an int in ``low..high``."""
    value = getattr(config, name)
    # bool is an int subclass, but `epochs_head: true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


def _check_float(config: TrainConfig, name: str, low: float, high: float) -> None:
    """Raise ValueError unless ``low < config.<name> <= high`` (a finite number)."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not low < value <= high:
        raise ValueError(f"{name} must be > {low} and <= {high}, got {value}")


# ---------------------------------------------------------------------------------------------
# Dataset


@dataclass
class Dataset:
    """Images and labels of the three splits, ready for the model, and where they came from.

    ``x_*`` are float32 ``(n, S, S, 1)`` arrays from :func:`ml.imaging.to_model_input`; ``y_*``
    are int64 class indices into ``class_names``. ``skipped`` lists unreadable files (paths
    relative to the dataset root). ``fingerprint`` identifies exactly the files used:
    ``{"sha256", "files", "counts": {split: {class: n}}, "val_source": "val" | "split from
    train"}``.
    """

    class_names: list[str]
    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    x_val: npt.NDArray[np.float32]
    y_val: npt.NDArray[np.int64]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]
    skipped: list[str] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Image:
    relpath: str
    sha256: str
    label: int
    pixels: npt.NDArray[np.float32]


def _class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``split_dir``."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    """Sorted visible PNG/JPEG files (by suffix) in ``class_dir``."""
    return sorted(
        p
        for p in class_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _read_class(
    root: Path,
    split: str,
    class_name: str,
    label: int,
    config: TrainConfig,
    skipped: list[str],
) -> list[_Image]:
    """Read the images of one class folder of one split, at most ``max_images_per_class``."""
    files = _image_files(root / split / class_name)
    if config.max_images_per_class is not None and len(files) > config.max_images_per_class:
        # A seeded random sample rather than the first N names: file names cluster by patient
        # and source ("person1_...", "NORMAL2-..."), so the first N would be a biased subset.
        key = f"{config.seed}/{split}/{class_name}".encode()
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
        files = [files[i] for i in rng.permutation(len(files))]
    limit = config.max_images_per_class
    images: list[_Image] = []
    for path in files:
        if limit is not None and len(images) >= limit:
            break
        relpath = path.relative_to(root).as_posix()
        try:
            data = path.read_bytes()
            pixels = to_model_input(decode_image(data), config.input_size)
        except (ImageError, OSError) as exc:
            log.warning("skipping unreadable image %s: %s", relpath, exc)
            skipped.append(relpath)
            continue
        images.append(_Image(relpath, hashlib.sha256(data).hexdigest(), label, pixels))
    images.sort(key=lambda image: image.relpath)
    return images


def _read_split(
    root: Path, split: str, class_names: list[str], config: TrainConfig, skipped: list[str]
) -> list[_Image]:
    """Read every class folder of one split; the split's classes must equal ``class_names``."""
    found = _class_folders(root / split)
    if found != class_names:
        missing = sorted(set(class_names) - set(found))
        extra = sorted(set(found) - set(class_names))
        parts = [f"missing {missing}" if missing else "", f"extra {extra}" if extra else ""]
        raise DatasetError(
            f"the classes of {split}/ differ from those of train/ {class_names}: "
            + ", ".join(p for p in parts if p)
        )
    images: list[_Image] = []
    for label, name in enumerate(class_names):
        images.extend(_read_class(root, split, name, label, config, skipped))
    return images


def _require_every_class(images: list[_Image], split: str, class_names: list[str]) -> None:
    """Raise DatasetError naming the classes of ``split`` that have no readable image."""
    present = {image.label for image in images}
    empty = [name for i, name in enumerate(class_names) if i not in present]
    if empty:
        raise DatasetError(
            f"class folder(s) {', '.join(f'{split}/{name}' for name in empty)} "
            "contain no readable PNG/JPEG images"
        )


def _stratified_split(
    images: list[_Image], n_classes: int, fraction: float, seed: int
) -> tuple[list[_Image], list[_Image]]:
    """Split ``images`` into (train, val), taking ``fraction`` of every class (seeded)."""
    rng = np.random.default_rng(seed)
    train: list[_Image] = []
    val: list[_Image] = []
    for label in range(n_classes):
        members = [image for image in images if image.label == label]
        order = rng.permutation(len(members))
        # At least one validation image per class, but never a class's last training image.
        n_val = min(max(1, round(fraction * len(members))), len(members) - 1)
        chosen = set(order[:n_val].tolist())
        for i, image in enumerate(members):
            (val if i in chosen else train).append(image)
    return train, val


def _arrays(
    images: list[_Image], input_size: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Stack images into ``(n, S, S, 1)`` float32 and their labels into int64."""
    if not images:
        return np.zeros((0, input_size, input_size, 1), np.float32), np.zeros(0, np.int64)
    x = np.stack([image.pixels for image in images]).astype(np.float32, copy=False)
    y = np.array([image.label for image in images], dtype=np.int64)
    return x, y


def _counts(images: list[_Image], class_names: list[str]) -> dict[str, int]:
    """Images per class name."""
    return {name: sum(1 for im in images if im.label == i) for i, name in enumerate(class_names)}


def load_dataset(root: str | os.PathLike[str], config: TrainConfig) -> Dataset:
    """Read a folder in the Kaggle layout ``<root>/{train,val,test}/<CLASS>/*.{jpg,jpeg,png}``.

    The classes are the sorted sub-folder names of ``train/`` (so a three-class set with COVID19
    works); ``val/`` and ``test/`` must have the same ones. ``test/`` is required: it is the
    held-out split the final evaluation runs on. ``val/`` is optional: when it is missing or
    holds fewer than ``config.min_val_images`` images, its images join the training pool and a
    stratified, seeded ``config.val_fraction`` of that pool becomes the validation split (the
    Kaggle set's own val/ has only 16 images, too few to early-stop on).

    Unreadable files are skipped and listed in ``Dataset.skipped``; a class left with no readable
    image in a split raises :class:`DatasetError`, as do missing folders.
    """
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"dataset folder {base} does not exist")
    for split in ("train", "test"):
        if not (base / split).is_dir():
            raise DatasetError(
                f"no {split}/ folder in {base}: expected {base}/{split}/<CLASS>/<images>"
            )
    class_names = _class_folders(base / "train")
    if len(class_names) < 2:
        raise DatasetError(
            f"train/ in {base} needs at least two class folders, found {class_names}"
        )

    skipped: list[str] = []
    train = _read_split(base, "train", class_names, config, skipped)
    _require_every_class(train, "train", class_names)
    test = _read_split(base, "test", class_names, config, skipped)
    _require_every_class(test, "test", class_names)
    val: list[_Image] = []
    if (base / "val").is_dir():
        val = _read_split(base, "val", class_names, config, skipped)
    if len(val) >= max(config.min_val_images, 1):
        _require_every_class(val, "val", class_names)
        val_source = "val"
    else:
        pool = sorted(train + val, key=lambda image: image.relpath)
        train, val = _stratified_split(pool, len(class_names), config.val_fraction, config.seed)
        val_source = "split from train"

    used = sorted((image.relpath, image.sha256) for image in train + val + test)
    digest = hashlib.sha256()
    for relpath, sha in used:
        digest.update(f"{relpath}\0{sha}\n".encode())
    x_train, y_train = _arrays(train, config.input_size)
    x_val, y_val = _arrays(val, config.input_size)
    x_test, y_test = _arrays(test, config.input_size)
    return Dataset(
        class_names=class_names,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
        skipped=sorted(skipped),
        fingerprint={
            "sha256": digest.hexdigest(),
            "files": len(used),
            "counts": {
                "train": _counts(train, class_names),
                "val": _counts(val, class_names),
                "test": _counts(test, class_names),
            },
            "val_source": val_source,
        },
    )


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class EpochReport:
    """Progress after one epoch, passed to ``train(on_epoch=...)``.

    ``epoch`` counts from 1 across both phases; ``total_epochs`` is the planned total (it drops
    when early stopping ends a phase before its planned epochs). ``eta_seconds`` is the mean
    epoch time so far times the planned epochs still to run.
    """

    phase: int
    epoch: int
    phase_epoch: int
    phase_epochs: int
    total_epochs: int
    metrics: dict[str, float]
    elapsed_seconds: float
    eta_seconds: float | None


@dataclass
class BatchReport:
    """Progress inside an epoch, passed to ``train(on_batch=...)`` every few seconds.

    ``epoch`` is the running epoch (from 1 across both phases), ``batch`` of ``batches`` the
    training batches it has finished. ``eta_seconds`` is measured on the batches so far: before
    the first epoch ends it is the only estimate there is.
    """

    phase: int
    epoch: int
    batch: int
    batches: int
    total_epochs: int
    elapsed_seconds: float
    eta_seconds: float | None


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


HISTORY_KEYS = ("loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc")


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


def _augmenter(seed: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """Random small rotations, zooms and shifts of a batch of grayscale images (0..255)."""
    import keras

    # Chest films are taken in a standard position, so only small geometric jitter is realistic.
    # No horizontal flip: a flipped chest puts the heart on the right (dextrocardia, a finding
    # in its own right) and mirrors the side markers, which are not images the model will see.
    # "reflect" fills the few border pixels with nearby anatomy instead of artificial black bars.
    layers = [
        keras.layers.RandomRotation(5 / 360, fill_mode="reflect", seed=seed),
        keras.layers.RandomZoom(0.1, fill_mode="reflect", seed=seed + 1),
        keras.layers.RandomTranslation(0.05, 0.05, fill_mode="reflect", seed=seed + 2),
    ]

    def augment(images: tf.Tensor) -> tf.Tensor:
        for layer in layers:
            images = layer(images, training=True)
        return images

    return augment


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
    if config.augment:
        augment = _augmenter(config.seed)
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

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
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


class _Progress:
    """Keeps the history, reports each epoch and polls ``should_stop`` during ``fit``."""

    def __init__(
        self,
        config: TrainConfig,
        started: float,
        batches: int,
        on_epoch: Callable[[EpochReport], None] | None,
        on_batch: Callable[[BatchReport], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.config = config
        self.started = started
        self.batches = batches
        self.on_epoch = on_epoch
        self.on_batch = on_batch
        self.should_stop = should_stop
        self.last_batch_report = -math.inf
        self.history: list[dict[str, Any]] = []
        self.epoch_seconds: list[float] = []
        self.phase = 1
        self.epoch_started = 0.0
        self.phase_first_epoch = 1  # global number of the current phase's first epoch
        self.phase_epoch_index = 0  # the running epoch within its phase, from 0

    def check_stop(self) -> None:
        """Raise TrainingCancelled if the caller asked to stop."""
        if self.should_stop is not None and self.should_stop():
            raise TrainingCancelled("training cancelled on request")

    def callback(self, model: keras.Model) -> keras.callbacks.Callback:
        """A Keras callback bound to ``model`` for one phase's ``fit``."""
        import keras

        def on_epoch_begin(epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.epoch_started = time.monotonic()
            self.phase_epoch_index = epoch

        def on_train_batch_end(batch: int, logs: dict[str, Any] | None = None) -> None:
            if self.should_stop is not None and self.should_stop():
                model.stop_training = True
                # Raised here, not after fit returns: fit would otherwise still run the epoch's
                # validation pass before noticing stop_training.
                raise TrainingCancelled("training cancelled on request")
            self.batch_done(batch + 1)

        def on_epoch_end(epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.record(epoch, logs or {})

        return keras.callbacks.LambdaCallback(
            on_epoch_begin=on_epoch_begin,
            on_epoch_end=on_epoch_end,
            on_train_batch_end=on_train_batch_end,
        )

    def batch_done(self, batch: int) -> None:
        """Send a BatchReport after the first batch and then every BATCH_REPORT_SECONDS."""
        now = time.monotonic()
        if self.on_batch is None or now - self.last_batch_report < BATCH_REPORT_SECONDS:
            return
        self.last_batch_report = now
        epoch = self.phase_first_epoch + self.phase_epoch_index
        remaining = self.remaining_epochs(self.phase_epoch_index + 1)
        per_batch = (now - self.epoch_started) / batch
        self.on_batch(
            BatchReport(
                phase=self.phase,
                epoch=epoch,
                batch=batch,
                batches=self.batches,
                total_epochs=epoch + remaining,
                elapsed_seconds=now - self.started,
                eta_seconds=per_batch * (self.batches - batch)
                + self.mean_epoch_seconds(per_batch) * remaining,
            )
        )

    def remaining_epochs(self, done_in_phase: int) -> int:
        """Planned epochs after the first ``done_in_phase`` of the current phase."""
        later = self.config.planned_epochs(2) if self.phase == 1 else 0
        return self.config.planned_epochs(self.phase) - done_in_phase + later

    def mean_epoch_seconds(self, per_batch: float) -> float:
        """Mean time of the finished epochs, or an estimate from the batch rate before any."""
        if self.epoch_seconds:
            return sum(self.epoch_seconds) / len(self.epoch_seconds)
        return per_batch * self.batches

    def start_phase(self, phase: int) -> None:
        """Mark the start of ``phase``; global epoch numbers continue from the last phase."""
        self.phase = phase
        self.phase_first_epoch = len(self.history) + 1

    def record(self, phase_epoch_index: int, logs: dict[str, Any]) -> None:
        """Append one history row and send the EpochReport."""
        now = time.monotonic()
        self.epoch_seconds.append(now - self.epoch_started)
        metrics = {key: float(logs[key]) for key in HISTORY_KEYS if key in logs}
        epoch = self.phase_first_epoch + phase_epoch_index
        self.history.append({"phase": self.phase, "epoch": epoch, **metrics})
        phase_epochs = self.config.planned_epochs(self.phase)
        remaining = self.remaining_epochs(phase_epoch_index + 1)
        mean = sum(self.epoch_seconds) / len(self.epoch_seconds)
        report = EpochReport(
            phase=self.phase,
            epoch=epoch,
            phase_epoch=phase_epoch_index + 1,
            phase_epochs=phase_epochs,
            total_epochs=epoch + remaining,
            metrics=metrics,
            elapsed_seconds=now - self.started,
            eta_seconds=mean * remaining,
        )
        if self.on_epoch is not None:
            self.on_epoch(report)


def train(
    config: TrainConfig,
    dataset: Dataset,
    *,
    base_model: keras.Model | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    on_batch: Callable[[BatchReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
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

    Early stopping watches ``val_auc`` per phase and restores the best epoch's weights. The
    same seed and data give the same weights.
    """
    import keras

    from ml.model import build_classifier

    started = time.monotonic()
    _check_inputs(config, dataset, base_model)
    keras.utils.set_random_seed(config.seed)
    if base_model is not None:
        model = _copy_model(base_model)
    else:
        model = build_classifier(dataset.class_names, config.input_size, config.base_weights)
    negative = negative_index(dataset.class_names, NEGATIVE_CLASS)
    class_weight = balanced_class_weights(dataset.y_train, len(dataset.class_names))
    train_ds, val_ds = _input_pipelines(config, dataset)
    batches = math.ceil(len(dataset.y_train) / config.batch_size)
    progress = _Progress(config, started, batches, on_epoch, on_batch, should_stop)

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

    final = _copy_model(model)
    threshold = None
    if config.target_sensitivity is not None:
        threshold = choose_threshold(final, dataset, config.target_sensitivity, config.batch_size)
    evaluation = evaluate_model(
        final, dataset.x_test, dataset.y_test, dataset.class_names, config.batch_size, threshold
    )
    return TrainResult(
        model=final,
        history=progress.history,
        evaluation=evaluation,
        curves_png=plot_curves(progress.history),
        seconds=time.monotonic() - started,
        dataset=dataset,
        config=config,
        decision_threshold=threshold,
    )


def evaluate_model(
    model: keras.Model,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.integer[Any]],
    class_names: Sequence[str],
    batch_size: int = 32,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Run ``model`` on ``x`` and score it with :func:`ml.evaluation.evaluate_predictions`."""
    probs = model.predict(x, batch_size=batch_size, verbose=0)
    return evaluate_predictions(
        y, np.asarray(probs, dtype=np.float64), class_names, threshold=threshold
    )


def choose_threshold(
    model: keras.Model, dataset: Dataset, target_sensitivity: float, batch_size: int = 32
) -> float | None:
    """The decision threshold reaching ``target_sensitivity`` on ``dataset``'s val split."""
    probs = model.predict(dataset.x_val, batch_size=batch_size, verbose=0)
    negative = negative_index(dataset.class_names)
    threshold = threshold_for_sensitivity(dataset.y_val, probs, negative, target_sensitivity)
    log.info("decision threshold %s: val sensitivity >= %g", threshold, target_sensitivity)
    return threshold


def calibrate_version(
    model_dir: os.PathLike[str] | str,
    version: int,
    dataset_root: os.PathLike[str] | str,
    target_sensitivity: float,
) -> ModelMetadata:
    """Publish ``version``'s weights again with a decision threshold for ``target_sensitivity``.

    The threshold is chosen on the dataset's val split (split off train the way the version's
    own training did, when its hyperparameters say how) and the test split is evaluated at it.
    The new version names ``version`` as its parent and is a candidate: promote it to serve it.

    Raises:
        DatasetError: the dataset cannot be used, or its classes differ from the version's.
        ValueError: the val split has no image of a finding to calibrate on.
    """
    from ml.versions import curves_path, load_model, read_metadata, save_version

    meta = read_metadata(model_dir, version)
    defaults = TrainConfig()
    hp = meta.hyperparameters
    config = TrainConfig(
        input_size=meta.input_size,
        base_weights=None,
        seed=int(hp.get("seed", defaults.seed)),
        val_fraction=float(hp.get("val_fraction", defaults.val_fraction)),
        min_val_images=int(hp.get("min_val_images", defaults.min_val_images)),
        target_sensitivity=target_sensitivity,
    )
    dataset = load_dataset(dataset_root, config)
    if dataset.class_names != meta.class_names:
        raise DatasetError(
            f"the dataset's classes {dataset.class_names} are not version {version}'s "
            f"{meta.class_names}"
        )
    model = load_model(model_dir, version)
    threshold = choose_threshold(model, dataset, target_sensitivity, config.batch_size)
    if threshold is None:
        raise ValueError("the val split has no image of a finding: nothing to calibrate on")
    evaluation = evaluate_model(
        model, dataset.x_test, dataset.y_test, dataset.class_names, config.batch_size, threshold
    )
    curves = curves_path(model_dir, version)
    return save_version(
        model,
        model_dir,
        class_names=meta.class_names,
        base_weights=f"version {version}",
        parent_version=version,
        hyperparameters={**hp, "target_sensitivity": target_sensitivity},
        dataset=dataset.fingerprint,
        training_seconds=meta.training_seconds,
        evaluation=evaluation,
        curves_png=curves.read_bytes() if curves is not None else None,
        decision_threshold=threshold,
        extra={"calibrated_from": version},
    )


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m ml.training``."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m ml.training",
        description="Train the VGG16 classifier on a dataset folder and write model.keras, "
        "evaluation.json (test split), history.json, curves.png and run.json into --out. "
        "Publishing a model version is not done here.",
    )
    parser.add_argument("--dataset", type=Path, required=True, help="<root>/{train,val,test}/")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--input-size", type=int, default=defaults.input_size)
    parser.add_argument("--epochs-head", type=int, default=defaults.epochs_head)
    parser.add_argument("--epochs-finetune", type=int, default=defaults.epochs_finetune)
    parser.add_argument("--lr-head", type=float, default=defaults.learning_rate_head)
    parser.add_argument("--lr-finetune", type=float, default=defaults.learning_rate_finetune)
    parser.add_argument(
        "--finetune-blocks", type=int, default=defaults.finetune_blocks, help="0..5"
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--augment", action=argparse.BooleanOptionalAction, default=defaults.augment
    )
    parser.add_argument("--patience", type=int, default=defaults.patience)
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--min-val-images", type=int, default=defaults.min_val_images)
    parser.add_argument("--max-images-per-class", type=int, default=None)
    parser.add_argument(
        "--target-sensitivity",
        type=float,
        default=None,
        help="label at the threshold that reaches this sensitivity on the val split "
        "(default: argmax)",
    )
    parser.add_argument(
        "--base-weights",
        default=defaults.base_weights,
        help="'imagenet' (downloads), 'none' (random init), or a VGG16 notop weights file",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig described by parsed command-line arguments."""
    base = None if str(args.base_weights).lower() == "none" else args.base_weights
    return TrainConfig(
        input_size=args.input_size,
        epochs_head=args.epochs_head,
        epochs_finetune=args.epochs_finetune,
        learning_rate_head=args.lr_head,
        learning_rate_finetune=args.lr_finetune,
        finetune_blocks=args.finetune_blocks,
        batch_size=args.batch_size,
        seed=args.seed,
        augment=args.augment,
        patience=args.patience,
        val_fraction=args.val_fraction,
        min_val_images=args.min_val_images,
        max_images_per_class=args.max_images_per_class,
        base_weights=base,
        target_sensitivity=args.target_sensitivity,
    )


def _log_epoch(report: EpochReport) -> None:
    """One progress line per epoch."""
    m = report.metrics
    eta = f"{report.eta_seconds / 60:.1f} min" if report.eta_seconds is not None else "?"
    log.info(
        "epoch %d/%d (phase %d, %d/%d): loss %.4f acc %.4f auc %.4f | "
        "val_loss %.4f val_acc %.4f val_auc %.4f | %.0f s elapsed, ETA %s",
        report.epoch,
        report.total_epochs,
        report.phase,
        report.phase_epoch,
        report.phase_epochs,
        m.get("loss", math.nan),
        m.get("accuracy", math.nan),
        m.get("auc", math.nan),
        m.get("val_loss", math.nan),
        m.get("val_accuracy", math.nan),
        m.get("val_auc", math.nan),
        report.elapsed_seconds,
        eta,
    )


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Train from the command line; return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        dataset = load_dataset(args.dataset, config)
    except DatasetError as exc:
        log.error("%s", exc)
        return 2
    counts = dataset.fingerprint["counts"]
    log.info(
        "dataset %s: classes %s, %s (val: %s), %d skipped, fingerprint %s",
        args.dataset,
        dataset.class_names,
        json.dumps(counts),
        dataset.fingerprint["val_source"],
        len(dataset.skipped),
        dataset.fingerprint["sha256"][:12],
    )
    log.info("config %s", json.dumps(config.to_dict()))
    result = train(config, dataset, on_epoch=_log_epoch)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    result.model.save(out / "model.keras")
    _write_json(out / "evaluation.json", result.evaluation)
    _write_json(out / "history.json", result.history)
    (out / "curves.png").write_bytes(result.curves_png)
    import keras
    import tensorflow as tf

    _write_json(
        out / "run.json",
        {
            "config": config.to_dict(),
            "class_names": dataset.class_names,
            "dataset": str(args.dataset),
            "fingerprint": dataset.fingerprint,
            "skipped": dataset.skipped,
            "seconds": round(result.seconds, 1),
            "decision_threshold": result.decision_threshold,
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        },
    )
    ev = result.evaluation
    log.info(
        "test split (n=%d): accuracy %.4f sensitivity %s specificity %s ROC AUC %s; "
        "confusion %s; %.0f s; wrote %s",
        ev["n"],
        ev["accuracy"],
        _fmt(ev["sensitivity"]),
        _fmt(ev["specificity"]),
        _fmt(ev["roc_auc"]),
        ev["confusion_matrix"],
        result.seconds,
        out,
    )
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
