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

__all__ = [
    "EXTERNAL_METRICS",
    "POLICIES",
    "Policy",
    "apply_external_gate",
    "decide",
    "external_gate",
    "needs_active_score",
    "score_version",
]

# What the external gate compares on every registered set: the ranking (threshold-free) and
# what a screening service exists for, the pneumonias it finds at its own threshold.
EXTERNAL_METRICS = ("roc_auc", "sensitivity")


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


def external_gate(
    candidate: Mapping[str, Mapping[str, Any]],
    active: Mapping[str, Mapping[str, Any]],
    active_version: int,
    tolerance: float,
) -> dict[str, Any]:
    """Whether a candidate falls behind the active version on a registered evaluation set.

    Args:
        candidate: The candidate's external evaluations by set name (``ml.external``'s docs).
        active: The active version's, by set name.
        active_version: The active version's number (for the reason).
        tolerance: How far below the active version each of :data:`EXTERNAL_METRICS` may be.

    Returns:
        ``{"tolerance", "checks": [{dataset, metric, candidate, active, ok}], "blocked_by",
        "reason"}``; ``blocked_by`` is the first set that blocks (None: nothing blocks). A set the
        candidate could not be scored on blocks; one the active version has no score on is
        skipped (nothing to fall behind).
    """
    checks: list[dict[str, Any]] = []
    blocked: tuple[str, str] | None = None
    for name in sorted(candidate):
        mine, theirs = candidate[name], active.get(name)
        if theirs is None or theirs.get("error"):
            continue
        if mine.get("error"):
            checks.append({"dataset": name, "metric": None, "ok": False})
            blocked = blocked or (name, f"it could not be evaluated on {name!r}: {mine['error']}")
            continue
        for metric in EXTERNAL_METRICS:
            score, current = mine.get(metric), theirs.get(metric)
            if current is None:
                continue
            ok = score is not None and score >= current - tolerance
            checks.append(
                {"dataset": name, "metric": metric, "candidate": score, "active": current, "ok": ok}
            )
            if not ok and blocked is None:
                why = (
                    f"{metric} {score} on {name!r} is more than {tolerance} below version "
                    f"{active_version}'s {current}"
                )
                blocked = (name, why)
    return {
        "tolerance": tolerance,
        "checks": checks,
        "blocked_by": blocked[0] if blocked else None,
        "reason": blocked[1] if blocked else None,
    }


def apply_external_gate(decision: Mapping[str, Any], gate: Mapping[str, Any]) -> dict[str, Any]:
    """``decision`` with the external gate recorded; a promotion it blocks becomes a candidate.

    Only an ``if_better`` promotion is gated: ``always`` and ``never`` mean what they say, and
    with no active version there is nothing to fall behind.
    """
    out = dict(decision) | {"external": dict(gate)}
    if decision.get("promoted") and decision.get("policy") == "if_better" and gate["blocked_by"]:
        out |= {"promoted": False, "reason": f"blocked by evaluation set {gate['blocked_by']!r}: "
                f"{gate['reason']}; kept as a candidate"}  # fmt: skip
    return out


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
