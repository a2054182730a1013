"""The promotion rule: whether a freshly trained version replaces the active one.

:func:`decide` is pure (evaluations in, a decision out); the trainer task applies it. Its only
evidence beyond the candidate's own evaluation is the active version re-scored on the same test
split, which :func:`score_version` computes from the dataset the run already loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ml.config import POLICIES, Policy
from ml.dataset import Dataset, x_test_at
from ml.evaluation import evaluate_model

__all__ = ["POLICIES", "Policy", "decide", "needs_active_score", "score_version"]


def needs_active_score(policy: str, active_version: int | None) -> bool:
    """Whether :func:`decide` compares against the active version (only ``if_better`` does)."""
    return policy not in ("never", "always") and active_version is not None


def decide(
    policy: str,
    metric: str,
    candidate: Mapping[str, Any],
    active_version: int | None,
    active: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The promotion decision for a candidate with evaluation ``candidate``.

    Args:
        policy: ``never`` (promote by hand), ``always``, or ``if_better``: promote when the
            candidate's ``metric`` is at least the active version's on the same test split.
        metric: The evaluation key compared.
        candidate: The new version's evaluation.
        active_version: The version served now, or None (then any policy but ``never``
            promotes).
        active: The active version's evaluation on the candidate's test split; None when it
            cannot be scored there (other classes). Read only when :func:`needs_active_score`.

    Returns:
        ``{"policy", "metric", "candidate", "active_version", "active", "promoted", "reason"}``:
        the job's outcome records it as is.
    """
    decision: dict[str, Any] = {
        "policy": policy,
        "metric": metric,
        "candidate": candidate.get(metric),
        "active_version": active_version,
        "active": None,
    }
    if policy == "never":
        return decision | {"promoted": False, "reason": "policy 'never': promote by hand"}
    if policy == "always" or active_version is None:
        why = "policy 'always'" if policy == "always" else "no version was active"
        return decision | {"promoted": True, "reason": why}
    if active is None:
        why = f"version {active_version} cannot be scored on this dataset (other classes)"
        return decision | {"promoted": False, "reason": why}
    current = decision["active"] = active.get(metric)
    score = decision["candidate"]
    if score is not None and (current is None or score >= current):
        why = f"{metric} {score} >= {current} of version {active_version} on the same test split"
        return decision | {"promoted": True, "reason": why}
    why = f"{metric} {score} < {current} of version {active_version}: kept as a candidate"
    return decision | {"promoted": False, "reason": why}


def score_version(
    model_dir: os.PathLike[str] | str,
    version: int,
    dataset: Dataset,
    root: os.PathLike[str] | str,
) -> dict[str, Any] | None:
    """``version``'s evaluation on ``dataset``'s test split, as it is served (at its threshold).

    None when its classes are not the dataset's. A version of another input size sees the same
    test files read again at its size; the rest of the dataset is not read again.
    """
    from ml.versions import load_model, read_metadata

    meta = read_metadata(model_dir, version)
    if dataset.class_names != meta.class_names:
        return None
    x_test = x_test_at(root, dataset, meta.input_size)
    model = load_model(model_dir, version)
    return evaluate_model(
        model, x_test, dataset.y_test, dataset.class_names, threshold=meta.decision_threshold
    )
