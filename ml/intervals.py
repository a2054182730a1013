"""95% intervals of test metrics: Wilson for proportions, percentile bootstrap for ROC AUC.

numpy only (no matplotlib, no TensorFlow), so the web process can build model cards with it;
:mod:`ml.evaluation` re-exports these (and the ROC AUC they rest on).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["bootstrap_auc_interval", "roc_auc", "wilson_interval"]

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_RESAMPLES = 1000


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval (95% by default) of ``successes / n``; ``None`` when ``n == 0``.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n
    successes, which is where a small evaluation set's sensitivity often sits. A count outside
    0..n is refused (``ValueError``).
    """
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in 0..{n}, got {successes}")
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
    stratified: bool = False,
) -> tuple[float, float] | None:
    """A 95% percentile-bootstrap interval of the ROC AUC of ``scores`` for boolean ``positive``.

    By default the images are resampled with replacement and resamples with only one label
    present are skipped. ``stratified`` resamples positives and negatives separately instead, so
    every resample keeps both (and the set's class balance). ``None`` when the AUC is undefined.
    """
    pos = np.asarray(positive, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if roc_auc(pos, s) is None:
        return None
    rng = np.random.default_rng(seed)
    pos_scores, neg_scores = s[pos], s[~pos]
    stratified_truth = np.concatenate(
        [np.ones(pos_scores.size, bool), np.zeros(neg_scores.size, bool)]
    )
    values = []
    for _ in range(resamples):
        if stratified:
            truth = stratified_truth
            sample = np.concatenate(
                [
                    rng.choice(pos_scores, pos_scores.size, replace=True),
                    rng.choice(neg_scores, neg_scores.size, replace=True),
                ]
            )
        else:
            index = rng.integers(0, pos.size, pos.size)
            truth, sample = pos[index], s[index]
        auc = roc_auc(truth, sample)
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
