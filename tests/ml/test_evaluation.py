"""Unit tests for ml.evaluation: metrics checked by hand and by brute force, and the curves PNG."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml.decision import negative_index
from ml.evaluation import evaluate_predictions, plot_curves, roc_auc

TWO = ["NORMAL", "PNEUMONIA"]
THREE = ["COVID19", "NORMAL", "PNEUMONIA"]


def pairwise_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """AUC by its definition: P(pos > neg) + 0.5 * P(pos == neg) over all pairs."""
    pos = scores[positive]
    neg = scores[~positive]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def two_class_probs(p_pneumonia: list[float]) -> np.ndarray:
    p = np.asarray(p_pneumonia, dtype=np.float64)
    return np.stack([1.0 - p, p], axis=1)


def test_module_does_not_import_tensorflow() -> None:
    # Reports must be recomputable without TF; a fresh interpreter shows what the import pulls.
    import subprocess

    code = "import sys, ml.evaluation; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_hand_computed_two_class_example() -> None:
    # true:      N    N    N    N    P    P    P    P    P    P
    # p(P):     .1   .2   .7   .4   .9   .8   .3   .6   .55  .45
    # predicted: N    N    P    N    P    P    N    P    P    N
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    probs = two_class_probs([0.1, 0.2, 0.7, 0.4, 0.9, 0.8, 0.3, 0.6, 0.55, 0.45])
    result = evaluate_predictions(y, probs, TWO)

    assert result["n"] == 10
    assert result["confusion_matrix"] == [[3, 1], [2, 4]]
    assert result["accuracy"] == pytest.approx(7 / 10)
    assert result["sensitivity"] == pytest.approx(4 / 6)
    assert result["specificity"] == pytest.approx(3 / 4)
    # Positive scores .9 .8 .3 .6 .55 .45 vs negatives .1 .2 .7 .4: pairs won = 4+4+2+3+3+3 = 19.
    assert result["roc_auc"] == pytest.approx(19 / 24)
    assert result["per_class"]["NORMAL"] == pytest.approx(
        {"precision": 3 / 5, "recall": 3 / 4, "f1": 2 / 3, "support": 4}
    )
    assert result["per_class"]["PNEUMONIA"] == pytest.approx(
        {"precision": 4 / 5, "recall": 4 / 6, "f1": 8 / 11, "support": 6}
    )
    assert result["class_names"] == TWO
    assert result["negative_class"] == "NORMAL"


def test_result_is_json_native() -> None:
    y = np.array([0, 1, 1, 0], dtype=np.int64)
    probs = two_class_probs([0.2, 0.7, 0.4, 0.1]).astype(np.float32)
    result = evaluate_predictions(y, probs, TWO)

    def walk(value: Any) -> None:
        assert type(value) in (dict, list, str, int, float, type(None)), type(value)
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(result)
    assert json.loads(json.dumps(result)) == result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_pairwise_definition_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    positive = rng.random(40) < 0.6
    # One decimal place guarantees many tied scores, across and within the two labels.
    scores = np.round(rng.random(40) + 0.3 * positive, 1)
    assert roc_auc(positive, scores) == pytest.approx(pairwise_auc(positive, scores))


def test_auc_extremes_and_all_ties() -> None:
    positive = np.array([False, False, True, True])
    assert roc_auc(positive, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc(positive, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc(positive, [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_auc_and_rates_are_none_with_one_class_present() -> None:
    only_pneumonia = evaluate_predictions(
        np.array([1, 1, 1]), two_class_probs([0.9, 0.2, 0.6]), TWO
    )
    assert only_pneumonia["roc_auc"] is None
    assert only_pneumonia["specificity"] is None
    assert only_pneumonia["sensitivity"] == pytest.approx(2 / 3)

    only_normal = evaluate_predictions(np.array([0, 0]), two_class_probs([0.9, 0.2]), TWO)
    assert only_normal["roc_auc"] is None
    assert only_normal["sensitivity"] is None
    assert only_normal["specificity"] == pytest.approx(1 / 2)


def test_three_classes_collapse_to_disease_vs_normal() -> None:
    # Classes COVID19, NORMAL, PNEUMONIA: the negative class NORMAL is index 1, not 0.
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array(
        [
            [0.6, 0.3, 0.1],  # COVID19 -> COVID19: detected
            [0.1, 0.2, 0.7],  # COVID19 -> PNEUMONIA: wrong class, still detected
            [0.1, 0.8, 0.1],  # NORMAL -> NORMAL
            [0.5, 0.4, 0.1],  # NORMAL -> COVID19: false alarm
            [0.3, 0.1, 0.6],  # PNEUMONIA -> PNEUMONIA
            [0.2, 0.7, 0.1],  # PNEUMONIA -> NORMAL: missed
        ]
    )
    result = evaluate_predictions(y, probs, THREE)

    assert result["negative_class"] == "NORMAL"
    assert result["confusion_matrix"] == [[1, 0, 1], [1, 1, 0], [0, 1, 1]]
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["sensitivity"] == pytest.approx(3 / 4)
    assert result["specificity"] == pytest.approx(1 / 2)
    disease = y != 1
    assert result["roc_auc"] == pytest.approx(pairwise_auc(disease, 1.0 - probs[:, 1]))
    assert result["per_class"]["COVID19"]["support"] == 2


def test_first_class_is_negative_when_none_is_named_normal() -> None:
    assert negative_index(["HEALTHY", "SICK"]) == 0
    assert negative_index(THREE) == 1
    y = np.array([0, 1])
    result = evaluate_predictions(y, two_class_probs([0.3, 0.8]), ["HEALTHY", "SICK"])
    assert result["negative_class"] == "HEALTHY"
    assert result["sensitivity"] == 1.0 and result["specificity"] == 1.0
    custom = evaluate_predictions(y, two_class_probs([0.3, 0.8]), TWO, negative_class="PNEUMONIA")
    assert custom["negative_class"] == "PNEUMONIA"
    # Now NORMAL is the "disease": scored by 1 - p(PNEUMONIA) = p(NORMAL), which ranks it first.
    assert custom["roc_auc"] == 1.0


def test_class_never_predicted_has_zero_precision() -> None:
    result = evaluate_predictions(np.array([0, 1]), two_class_probs([0.9, 0.8]), TWO)
    assert result["per_class"]["NORMAL"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 1,
    }


@pytest.mark.parametrize(
    ("y", "probs", "message"),
    [
        (np.array([0, 1]), np.ones((3, 2)) / 2, "labels"),
        (np.array([0, 1]), np.ones((2, 3)) / 3, "shape"),
        (np.array([0, 2]), np.ones((2, 2)) / 2, "0..1"),
        (np.array([0.0, 1.0]), np.ones((2, 2)) / 2, "integers"),
        (np.zeros(0, dtype=int), np.zeros((0, 2)), "nothing"),
    ],
)
def test_bad_input_is_refused(y: np.ndarray, probs: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_predictions(y, probs, TWO)


def history_rows(phase1: int, phase2: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(phase1 + phase2):
        rows.append(
            {
                "phase": 1 if i < phase1 else 2,
                "epoch": i + 1,
                "loss": 1.0 / (i + 1),
                "accuracy": 0.5 + 0.04 * i,
                "auc": 0.6 + 0.03 * i,
                "val_loss": 1.1 / (i + 1),
                "val_accuracy": 0.5 + 0.03 * i,
                "val_auc": 0.6 + 0.02 * i,
            }
        )
    return rows


@pytest.mark.parametrize(("phase1", "phase2"), [(3, 4), (0, 2), (2, 0), (0, 0)])
def test_plot_curves_returns_png_and_writes_file(phase1: int, phase2: int, tmp_path: Path) -> None:
    png = plot_curves(history_rows(phase1, phase2))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")

    target = tmp_path / "curves.png"
    written = plot_curves(history_rows(phase1, phase2), target)
    assert target.read_bytes() == written
    assert written.startswith(b"\x89PNG")


def test_plot_curves_does_not_touch_pyplot() -> None:
    plot_curves(history_rows(1, 1))
    pyplot = sys.modules.get("matplotlib.pyplot")
    # Either pyplot was never imported, or (if another test imported it) no figure was left open.
    assert pyplot is None or not pyplot.get_fignums()
