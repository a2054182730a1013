"""95% intervals for the figures an evaluation reports: Wilson for proportions, bootstrap for AUC.

numpy only; every value returned is a plain ``float`` (JSON-ready).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from ml.evaluation import roc_auc

__all__ = ["bootstrap_auc", "wilson"]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of the proportion ``k / n`` (``None`` when ``n`` is 0).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at k = 0 or k = n,
    which is where a small evaluation set's sensitivity often sits.
    """
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in 0..{n}, got {k}")
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_auc(
    labels: npt.ArrayLike, scores: npt.ArrayLike, n: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """A percentile bootstrap 95% interval of the ROC AUC of ``scores`` for boolean ``labels``.

    Positives and negatives are resampled separately (a stratified bootstrap), so every resample
    has both and its AUC is defined. ``None`` when one of the two labels is absent.
    """
    positive = np.asarray(labels, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos, neg = s[positive], s[~positive]
    if pos.size == 0 or neg.size == 0:
        return None
    rng = np.random.default_rng(seed)
    truth = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
    aucs = np.empty(n)
    for i in range(n):
        sample = np.concatenate(
            [rng.choice(pos, pos.size, replace=True), rng.choice(neg, neg.size, replace=True)]
        )
        auc = roc_auc(truth, sample)
        aucs[i] = auc if auc is not None else np.nan  # never None: both labels present
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    return float(lo), float(hi)
