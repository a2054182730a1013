"""95% intervals of test metrics: Wilson for proportions, percentile bootstrap for ROC AUC.

numpy only (no matplotlib, no TensorFlow), so the web process can build model cards with it;
:mod:`ml.evaluation` re-exports these (and the ROC AUC they rest on).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["bootstrap_auc", "bootstrap_auc_interval", "roc_auc", "wilson", "wilson_interval"]

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_RESAMPLES = 1000


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval (95% by default) of a proportion; ``None`` when ``n == 0``."""
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_auc_interval(
    positive: npt.ArrayLike,
    scores: npt.ArrayLike,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float] | None:
    """A 95% percentile-bootstrap interval of the ROC AUC (images resampled with replacement).

    Resamples with only one label present are skipped; ``None`` when the AUC is undefined.
    """
    pos = np.asarray(positive, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if roc_auc(pos, s) is None:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        index = rng.integers(0, pos.size, pos.size)
        auc = roc_auc(pos[index], s[index])
        if auc is not None:
            values.append(auc)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def roc_auc(positive: npt.ArrayLike, scores: npt.ArrayLike) -> float | None:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positive``.

    Computed with the Mann-Whitney U statistic on average ranks, so tied scores count one half,
    exactly as the pairwise definition P(score_pos > score_neg) + 0.5 * P(equal). Returns
    ``None`` when only one of the two labels is present (the AUC is undefined then).
    """
    pos = np.asarray(positive, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if pos.shape != s.shape:
        raise ValueError(f"labels {pos.shape} and scores {s.shape} differ in shape")
    n_pos = int(pos.sum())
    n_neg = int(pos.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    # Average ranks (1-based): every member of a group of equal scores gets the group's mean rank.
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    group_rank = first_rank + (counts - 1) / 2.0
    ranks = group_rank[inverse]
    u = float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """:func:`wilson_interval` of ``k / n`` that refuses a ``k`` outside 0..n (external sets).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at k = 0 or k = n,
    which is where a small evaluation set's sensitivity often sits.
    """
    if n > 0 and not 0 <= k <= n:
        raise ValueError(f"k must lie in 0..{n}, got {k}")
    return wilson_interval(k, n, z)


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
