"""Scoring a classifier's predictions and drawing its training curves.

Only numpy and matplotlib are imported (no TensorFlow: :func:`evaluate_model` runs the model it
is given), so reports can be recomputed or redrawn in any process. Every number returned is a
plain Python ``float``/``int`` (or ``None``), ready for ``json.dumps`` and for a Celery result
backend.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ml.decision import NEGATIVE_CLASS, decide, negative_index
from ml.intervals import bootstrap_auc_interval, roc_auc, wilson_interval

if TYPE_CHECKING:
    import keras

__all__ = [
    "bootstrap_auc_interval",
    "evaluate_model",
    "evaluate_predictions",
    "plot_curves",
    "roc_auc",
    "wilson_interval",
]


def _ratio(numerator: int, denominator: int) -> float | None:
    """``numerator / denominator`` as a float, or None when the denominator is zero."""
    return numerator / denominator if denominator else None


def evaluate_predictions(
    y_true: npt.ArrayLike,
    probs: npt.ArrayLike,
    class_names: Sequence[str],
    negative_class: str = NEGATIVE_CLASS,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Score class probabilities against true labels.

    The screening view collapses every class other than ``negative_class`` into "disease": an
    image of any disease counts as detected when it is predicted as any disease class (so a
    PNEUMONIA image called COVID19 is still a detection), and the ROC AUC ranks images by
    ``1 - p(negative_class)``. When no class is called ``negative_class`` the first one is.

    Args:
        y_true: ``(n,)`` integer class indices.
        probs: ``(n, k)`` class probabilities (rows need not sum exactly to 1).
        class_names: The ``k`` class names, in the model's output order.
        negative_class: Name of the "no finding" class.
        threshold: Label by :func:`ml.decision.decide` at this threshold instead of argmax.

    Returns:
        A JSON-native dict: ``n``, ``accuracy``, ``sensitivity``, ``specificity``, ``roc_auc``
        (``None`` where the needed class is absent from ``y_true``), ``confusion_matrix``
        (rows = true class, columns = predicted class), ``per_class`` ``{name: {precision,
        recall, f1, support}}`` (0.0 where a ratio is 0/0, scikit-learn's convention),
        ``class_names``, ``negative_class`` and ``threshold``.
    """
    names = [str(c) for c in class_names]
    labels = np.asarray(y_true).ravel()
    p = np.asarray(probs, dtype=np.float64)
    k = len(names)
    if k < 2:
        raise ValueError(f"need at least two classes, got {names}")
    if p.ndim != 2 or p.shape[1] != k:
        raise ValueError(f"probs must have shape (n, {k}), got {p.shape}")
    if labels.shape[0] != p.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels but {p.shape[0]} rows of probabilities")
    if labels.size == 0:
        raise ValueError("nothing to evaluate: no labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must lie in 0..{k - 1}, got {labels.min()}..{labels.max()}")

    neg = negative_index(names, negative_class)
    predicted = decide(p, neg, threshold)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)

    per_class: dict[str, dict[str, float | int]] = {}
    for i, name in enumerate(names):
        tp = int(confusion[i, i])
        support = int(confusion[i].sum())
        predicted_i = int(confusion[:, i].sum())
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": support,
        }

    is_disease = labels != neg
    called_disease = predicted != neg
    n = int(labels.size)
    auc = roc_auc(is_disease, 1.0 - p[:, neg])
    hits = int(np.trace(confusion))
    tp = int((is_disease & called_disease).sum())
    tn = int((~is_disease & ~called_disease).sum())
    auc_ci = bootstrap_auc_interval(is_disease, 1.0 - p[:, neg])
    intervals = {
        "method": "wilson (proportions), percentile bootstrap of 1000 resamples (roc_auc)",
        "accuracy": wilson_interval(hits, n),
        "sensitivity": wilson_interval(tp, int(is_disease.sum())),
        "specificity": wilson_interval(tn, int((~is_disease).sum())),
        "roc_auc": auc_ci,
    }
    return {
        "n": n,
        "accuracy": float(np.trace(confusion)) / n,
        "sensitivity": _ratio(int((is_disease & called_disease).sum()), int(is_disease.sum())),
        "specificity": _ratio(int((~is_disease & ~called_disease).sum()), int((~is_disease).sum())),
        "roc_auc": None if auc is None else float(auc),
        "confusion_matrix": confusion.tolist(),
        "per_class": per_class,
        "class_names": names,
        "negative_class": names[neg],
        "threshold": threshold,
        "intervals_95": {k: list(v) if isinstance(v, tuple) else v for k, v in intervals.items()},
    }


def _series(history: Sequence[dict[str, Any]], key: str) -> list[float]:
    """The values of ``key`` across ``history`` as floats (NaN where missing)."""
    out = []
    for row in history:
        value = row.get(key)
        out.append(float(value) if value is not None else math.nan)
    return out


def plot_curves(
    history: Sequence[dict[str, Any]], path: str | os.PathLike[str] | None = None
) -> bytes:
    """Draw loss, accuracy and AUC per epoch (train vs validation) and return the PNG bytes.

    ``history`` rows are ``{"phase", "epoch", "loss", "accuracy", "auc", "val_loss",
    "val_accuracy", "val_auc"}`` as :func:`ml.training.train` records them. A dashed vertical
    line marks where phase 2 (fine-tuning) starts. When ``path`` is given the PNG is also
    written there.
    """
    # A bare Figure with an Agg canvas: no pyplot, so no global backend switch and no figure
    # registry that leaks memory in a long-running worker.
    fig = Figure(figsize=(13, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    epochs = [int(row["epoch"]) for row in history]
    finetune_start = next((int(row["epoch"]) for row in history if row.get("phase") == 2), None)
    panels = [
        ("loss", "Loss"),
        ("accuracy", "Accuracy"),
        ("auc", "ROC AUC (disease vs negative class)"),
    ]
    for ax, (key, title) in zip(fig.subplots(1, 3), panels, strict=True):
        ax.plot(epochs, _series(history, key), marker="o", markersize=3, label="train")
        ax.plot(
            epochs, _series(history, f"val_{key}"), marker="o", markersize=3, label="validation"
        )
        if finetune_start is not None:
            ax.axvline(finetune_start - 0.5, color="grey", linestyle="--", linewidth=1)
            ax.text(
                finetune_start - 0.5,
                0.98,
                " fine-tuning",
                transform=ax.get_xaxis_transform(),
                va="top",
                ha="left",
                fontsize=8,
                color="grey",
            )
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(min(epochs) - 0.7, max(epochs) + 0.7)
            # Integer epoch ticks only; matplotlib would otherwise label 1.5, 2.5, ...
            ax.xaxis.get_major_locator().set_params(integer=True)
    fig.axes[0].legend(loc="best", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def evaluate_model(
    model: keras.Model,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.integer[Any]],
    class_names: Sequence[str],
    batch_size: int = 32,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Run ``model`` on ``x`` and score it with :func:`evaluate_predictions`."""
    probs = model.predict(x, batch_size=batch_size, verbose=0)
    return evaluate_predictions(
        y, np.asarray(probs, dtype=np.float64), class_names, threshold=threshold
    )
