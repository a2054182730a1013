"""The decision rule: from class probabilities to a label, at argmax or at a chosen threshold.

Pure numpy, shared by evaluation (ml.evaluation), serving (ml.model.Classifier) and training,
which picks the threshold on the validation split. A threshold applies to the screening score
``1 - p(negative class)``: an image whose score reaches it is called a finding (the most
probable disease class), any other the negative class. Without a threshold the label is the
argmax, the notebook's rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["NEGATIVE_CLASS", "decide", "negative_index", "threshold_for_sensitivity"]

NEGATIVE_CLASS = "NORMAL"
"""The class that means "no disease"; every other class counts as a finding."""


def negative_index(class_names: Sequence[str], negative_class: str = NEGATIVE_CLASS) -> int:
    """Return the index of ``negative_class`` in ``class_names``, or 0 when it is not there."""
    names = list(class_names)
    return names.index(negative_class) if negative_class in names else 0


def decide(probs: npt.ArrayLike, negative: int, threshold: float | None) -> npt.NDArray[np.int64]:
    """Predicted class index of each row of ``probs`` (``(n, k)``), by the rule above."""
    p = np.asarray(probs, dtype=np.float64)
    if threshold is None:
        return p.argmax(axis=1).astype(np.int64)
    disease = p.copy()
    disease[:, negative] = -np.inf
    called = 1.0 - p[:, negative] >= threshold
    return np.where(called, disease.argmax(axis=1), negative).astype(np.int64)


def threshold_for_sensitivity(
    y_true: npt.ArrayLike, probs: npt.ArrayLike, negative: int, target: float
) -> float | None:
    """The highest threshold whose sensitivity on these images is at least ``target``.

    Highest, so that specificity is as high as the target allows. ``None`` when no image has a
    finding (nothing to calibrate on).
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    labels = np.asarray(y_true).ravel()
    scores = 1.0 - np.asarray(probs, dtype=np.float64)[:, negative]
    positive = np.sort(scores[labels != negative])[::-1]
    if positive.size == 0:
        return None
    # The k-th highest score of a finding: at it, k of them are called.
    k = min(positive.size, math.ceil(target * positive.size - 1e-9))
    return float(positive[k - 1])
