"""The decision rule (argmax or a threshold on 1 - p(NORMAL)) and choosing the threshold."""

from __future__ import annotations

import numpy as np
import pytest

from ml.decision import decide, threshold_for_sensitivity
from ml.evaluation import evaluate_predictions

TWO = ["NORMAL", "PNEUMONIA"]
# p(NORMAL) per image; the findings (label 1) score 1 - p = 0.9, 0.6, 0.4, 0.2.
P_NORMAL = np.array([0.1, 0.4, 0.6, 0.8, 0.7, 0.9, 0.95])
LABELS = np.array([1, 1, 1, 1, 0, 0, 0])
PROBS = np.stack([P_NORMAL, 1 - P_NORMAL], axis=1)


def test_without_a_threshold_the_label_is_the_argmax() -> None:
    assert decide(PROBS, 0, None).tolist() == [1, 1, 0, 0, 0, 0, 0]


def test_a_threshold_calls_every_score_at_or_above_it() -> None:
    assert decide(PROBS, 0, 0.3).tolist() == [1, 1, 1, 0, 1, 0, 0]
    assert decide(PROBS, 0, 0.0).tolist() == [1] * 7


def test_with_three_classes_a_finding_is_the_most_probable_disease() -> None:
    probs = np.array([[0.55, 0.15, 0.30], [0.70, 0.20, 0.10], [0.2, 0.5, 0.3]])
    assert decide(probs, 0, 0.4).tolist() == [2, 0, 1]
    assert decide(probs, 1, 0.4).tolist() == [0, 0, 2]  # the negative class at index 1


@pytest.mark.parametrize(
    ("target", "threshold"), [(1.0, 0.2), (0.75, 0.4), (0.5, 0.6), (0.25, 0.9), (0.3, 0.6)]
)
def test_threshold_for_sensitivity_is_the_highest_that_reaches_the_target(
    target: float, threshold: float
) -> None:
    found = threshold_for_sensitivity(LABELS, PROBS, 0, target)
    assert found == pytest.approx(threshold)
    assert found is not None
    ev = evaluate_predictions(LABELS, PROBS, TWO, threshold=found)
    assert ev["sensitivity"] >= target
    assert ev["threshold"] == found


def test_threshold_for_sensitivity_needs_findings_and_a_sane_target() -> None:
    assert threshold_for_sensitivity(np.zeros(3, int), PROBS[:3], 0, 0.9) is None
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="target sensitivity"):
            threshold_for_sensitivity(LABELS, PROBS, 0, bad)


def test_evaluation_at_a_threshold_trades_specificity_for_sensitivity() -> None:
    at_argmax = evaluate_predictions(LABELS, PROBS, TWO)
    screening = evaluate_predictions(LABELS, PROBS, TWO, threshold=0.15)
    assert at_argmax["threshold"] is None
    assert (at_argmax["sensitivity"], at_argmax["specificity"]) == (0.5, 1.0)
    assert screening["sensitivity"] == 1.0
    assert screening["specificity"] == pytest.approx(2 / 3)
    assert screening["confusion_matrix"] == [[2, 1], [0, 4]]
    assert screening["roc_auc"] == at_argmax["roc_auc"]  # the ranking does not change
