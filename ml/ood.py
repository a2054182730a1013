"""The out-of-distribution gate: is an input like the images a version was trained on?

Method (Lee et al. 2018, "A Simple Unified Framework for Detecting Out-of-Distribution Samples
and Adversarial Attacks"): the globally pooled VGG16 features the classification head already
reads are modelled as class-conditional Gaussians with one shared covariance, fitted on the
training split. An image's score is its smallest squared Mahalanobis distance to a class mean;
the threshold is the score quantile of the validation split at a stated acceptance (default
99%), never the test split. The covariance is shrunk towards a scaled identity with the
Ledoit-Wolf (2004) weight, so the 512x512 estimate stays invertible on a few hundred images.

The gate is numpy only: :func:`fit_gate` gets the features from
:func:`ml.model.Classifier`-style feature models (:func:`feature_model`, Keras imported lazily),
and the worker scores the features its one batched call returned. Stored as ``ood.npz`` in the
version folder (class means and the precision matrix, float32: ~1 MB for 512-d features).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import keras

__all__ = [
    "DEFAULT_ACCEPTANCE",
    "METHOD",
    "OOD_FILE",
    "REASON",
    "MahalanobisGate",
    "feature_layer_name",
    "feature_model",
    "fit_gate",
    "ledoit_wolf_covariance",
    "load_gate",
]

log = logging.getLogger(__name__)

METHOD = "mahalanobis"
OOD_FILE = "ood.npz"
REASON = "not recognised as a frontal chest X-ray"
DEFAULT_ACCEPTANCE = 0.99
POOL_LAYER = "pool"  # the GlobalAveragePooling2D the head reads (ml.model.build_classifier)

Floats = npt.NDArray[np.floating[Any]]


def ledoit_wolf_covariance(centred: Floats) -> tuple[npt.NDArray[np.float64], float]:
    """The Ledoit-Wolf shrunk covariance of already centred rows, and its shrinkage weight.

    ``(1 - s) S + s m I`` with ``S`` the sample covariance, ``m = trace(S) / d`` and ``s`` the
    weight minimising the expected Frobenius loss (Ledoit & Wolf 2004, as scikit-learn's
    ``ledoit_wolf`` with ``assume_centered=True``).
    """
    x = np.asarray(centred, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need at least two feature rows to fit a covariance, got {n}")
    s = x.T @ x / n
    m = float(np.trace(s)) / d
    target_gap = float(np.sum((s - m * np.eye(d)) ** 2))
    norms = np.sum(x * x, axis=1)
    spread = (float(np.sum(norms**2)) / n - float(np.sum(s * s))) / n
    shrink = 1.0 if target_gap <= 0 else min(1.0, max(0.0, spread / target_gap))
    cov = (1.0 - shrink) * s + shrink * m * np.eye(d)
    return cov, shrink


@dataclass(frozen=True)
class MahalanobisGate:
    """Class means, the shared precision matrix and the threshold of one version's gate."""

    means: npt.NDArray[np.float32]  # (classes, d)
    precision: npt.NDArray[np.float32]  # (d, d)
    threshold: float
    acceptance: float  # the share of val images the threshold was chosen to accept
    layer: str = POOL_LAYER
    method: str = METHOD

    def score(self, features: Floats) -> npt.NDArray[np.float64]:
        """Smallest squared Mahalanobis distance of each row of ``(n, d)`` to a class mean."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.means.shape[1]:
            raise ValueError(f"features must be (n, {self.means.shape[1]}), got {f.shape}")
        p = self.precision.astype(np.float64)
        best = np.full(f.shape[0], np.inf)
        for mean in self.means.astype(np.float64):
            diff = f - mean
            best = np.minimum(best, np.einsum("ij,ij->i", diff @ p, diff))
        return best

    def refuses(self, scores: Floats) -> npt.NDArray[np.bool_]:
        """Which scores are above the threshold (not like the training images)."""
        return np.asarray(scores) > self.threshold

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the gate as ``.npz`` (float32 arrays, the threshold and its acceptance)."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            means=self.means.astype(np.float32),
            precision=self.precision.astype(np.float32),
            threshold=np.float64(self.threshold),
            acceptance=np.float64(self.acceptance),
            layer=np.str_(self.layer),
            method=np.str_(self.method),
        )
        Path(path).write_bytes(buffer.getvalue())


def load_gate(path: str | os.PathLike[str]) -> MahalanobisGate | None:
    """Read a gate written by :meth:`MahalanobisGate.save`; ``None`` when there is no file."""
    if not Path(path).is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return MahalanobisGate(
            means=data["means"].astype(np.float32),
            precision=data["precision"].astype(np.float32),
            threshold=float(data["threshold"]),
            acceptance=float(data["acceptance"]),
            layer=str(data["layer"]),
            method=str(data["method"]),
        )


def fit_mahalanobis(
    features: Floats, labels: npt.NDArray[np.integer[Any]], n_classes: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], float]:
    """Class means, the precision of the shared shrunk covariance, and the shrinkage weight."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).ravel()
    present = [c for c in range(n_classes) if np.any(y == c)]
    if not present:
        raise ValueError("no labelled feature rows to fit the gate on")
    means = np.stack([f[y == c].mean(axis=0) for c in present])
    centred = f - means[np.searchsorted(present, y)]
    cov, shrink = ledoit_wolf_covariance(centred)
    # eigh on the symmetric matrix: its inverse stays symmetric and positive definite.
    values, vectors = np.linalg.eigh(cov)
    values = np.maximum(values, values.max() * 1e-9)
    precision = (vectors / values) @ vectors.T
    return means.astype(np.float32), precision.astype(np.float32), shrink


def threshold_for_acceptance(val_scores: Floats, acceptance: float) -> float:
    """The smallest threshold that accepts at least ``acceptance`` of ``val_scores``."""
    if not 0.0 < acceptance <= 1.0:
        raise ValueError(f"acceptance must be in (0, 1], got {acceptance}")
    s = np.sort(np.asarray(val_scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("no val scores to choose a threshold on")
    index = min(s.size - 1, int(np.ceil(acceptance * s.size)) - 1)
    return float(s[max(index, 0)])


def feature_layer_name(model: keras.Model) -> str | None:
    """The pooled-feature layer the gate reads: ``pool``, else the last global average pooling."""
    import keras

    names = [layer.name for layer in model.layers]
    if POOL_LAYER in names:
        return POOL_LAYER
    pools = [
        layer.name
        for layer in model.layers
        if isinstance(layer, keras.layers.GlobalAveragePooling2D)
    ]
    return pools[-1] if pools else None


def feature_model(model: keras.Model, layer: str) -> keras.Model:
    """``model`` with two outputs: its probabilities and the pooled features of ``layer``.

    Both come from one forward pass (the features are an intermediate tensor of the same graph).
    """
    import keras

    return keras.Model(model.inputs, [model.outputs[0], model.get_layer(layer).output])


def features_of(
    model: keras.Model, x: npt.NDArray[np.float32], layer: str, batch_size: int = 32
) -> npt.NDArray[np.float32]:
    """The pooled features of ``x`` (batched, inference mode)."""
    import keras

    sub = keras.Model(model.inputs, model.get_layer(layer).output)
    out = sub.predict(x, batch_size=batch_size, verbose=0)
    return np.asarray(out, dtype=np.float32)


def acceptance_of(gate: MahalanobisGate, features: Floats) -> float:
    """The share of ``features`` the gate accepts."""
    return float(np.mean(~gate.refuses(gate.score(features))))


def fit_gate(
    model: keras.Model,
    dataset: Any,
    acceptance: float = DEFAULT_ACCEPTANCE,
    batch_size: int = 32,
) -> tuple[MahalanobisGate, dict[str, Any]] | tuple[None, dict[str, Any]]:
    """Fit a gate on ``dataset``'s train split, threshold it on val, report val and test.

    ``dataset`` is an :class:`ml.dataset.Dataset`. Returns the gate and the summary kept in the
    version's metadata (``ood``): method, threshold, target acceptance, the measured acceptance
    on val and test, the shrinkage weight and how many images it was fitted on; or ``(None,
    {"method": "none", ...})`` when the model has no pooled-feature layer.
    """
    layer = feature_layer_name(model)
    if layer is None:
        return None, none_summary("the model has no global pooling layer to read features from")
    k = len(dataset.class_names)
    train = features_of(model, dataset.x_train, layer, batch_size)
    means, precision, shrink = fit_mahalanobis(train, dataset.y_train, k)
    provisional = MahalanobisGate(means, precision, np.inf, acceptance, layer)
    val_scores = provisional.score(features_of(model, dataset.x_val, layer, batch_size))
    threshold = threshold_for_acceptance(val_scores, acceptance)
    gate = MahalanobisGate(means, precision, threshold, acceptance, layer)
    test = features_of(model, dataset.x_test, layer, batch_size)
    summary = {
        "method": METHOD,
        "layer": layer,
        "feature_dim": int(means.shape[1]),
        "threshold": threshold,
        "target_acceptance": acceptance,
        "val_acceptance": float(np.mean(val_scores <= threshold)),
        "test_acceptance": acceptance_of(gate, test),
        "n_train": len(train),
        "n_val": len(val_scores),
        "n_test": len(test),
        "shrinkage": shrink,
        "threshold_chosen_on": "val",
    }
    log.info(
        "OOD gate: threshold %.1f accepts %.3f of val, %.3f of test",
        threshold,
        summary["val_acceptance"],
        summary["test_acceptance"],
    )
    return gate, summary


def none_summary(why: str) -> dict[str, Any]:
    """The metadata of a version without a gate, saying why."""
    return {"method": "none", "why": why}


GATE_OFF_FILE = "gate-off.json"  # present in a version folder: an administrator turned it off


def gate_off_path(version_folder: str | os.PathLike[str]) -> Path:
    """Where the per-version "gate off" marker lives."""
    return Path(version_folder) / GATE_OFF_FILE


def read_gate_off(version_folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Who turned a version's gate off, when and why; ``None`` when it is on."""
    import json

    path = gate_off_path(version_folder)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"at": None, "actor": None, "reason": "unreadable marker"}
    return doc if isinstance(doc, dict) else {}


def set_gate_off(
    version_folder: str | os.PathLike[str], off: bool, actor: str, reason: str = ""
) -> None:
    """Turn a version's gate off (write the marker atomically) or on again (remove it)."""
    import json
    import tempfile
    from datetime import UTC, datetime

    path = gate_off_path(version_folder)
    if not off:
        path.unlink(missing_ok=True)
        return
    doc = {"at": datetime.now(UTC).isoformat(), "actor": actor, "reason": reason}
    fd, tmp = tempfile.mkstemp(prefix=".gate-off-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(doc) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def fit_gate_on_folder(
    model: keras.Model,
    dataset_root: str | os.PathLike[str] | None,
    class_names: list[str],
    acceptance: float = DEFAULT_ACCEPTANCE,
    hyperparameters: dict[str, Any] | None = None,
) -> tuple[MahalanobisGate | None, dict[str, Any]]:
    """Fit a gate for ``model`` on a dataset folder; without one, say the version has no gate.

    The val split is made the way the version's training made it when ``hyperparameters`` say
    how (seed, val fraction), so the threshold is never chosen on images the model trained on.
    """
    if dataset_root is None:
        return None, none_summary("no dataset was given when the version was published")
    from ml.config import TrainConfig
    from ml.dataset import DatasetError, load_dataset

    hp = hyperparameters or {}
    defaults = TrainConfig()
    config = TrainConfig(
        input_size=int(model.input_shape[1]),
        base_weights=None,
        seed=int(hp.get("seed", defaults.seed)),
        val_fraction=float(hp.get("val_fraction", defaults.val_fraction)),
        min_val_images=int(hp.get("min_val_images", defaults.min_val_images)),
    )
    dataset = load_dataset(dataset_root, config)
    if dataset.class_names != list(class_names):
        raise DatasetError(
            f"the dataset's classes {dataset.class_names} are not the model's {class_names}"
        )
    gate, summary = fit_gate(model, dataset, acceptance, config.batch_size)
    summary["dataset"] = {"path": os.fspath(dataset_root), "sha256": dataset.fingerprint["sha256"]}
    return gate, summary
