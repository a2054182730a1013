"""Tests of ml.promotion: the pure promotion rule, and re-scoring on the run's own test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ml.config import TrainConfig
from ml.dataset import load_dataset, x_test_at
from ml.promotion import decide, needs_active_score
from tests.ml.test_training import make_dataset

CANDIDATE = {"roc_auc": 0.9, "accuracy": 0.8}


def test_never_and_always_need_no_comparison() -> None:
    assert not needs_active_score("never", 3)
    assert not needs_active_score("always", 3)
    assert not needs_active_score("if_better", None)
    assert needs_active_score("if_better", 3)
    never = decide("never", "roc_auc", CANDIDATE, 3)
    assert (never["promoted"], never["reason"]) == (False, "policy 'never': promote by hand")
    always = decide("always", "roc_auc", CANDIDATE, 3)
    assert (always["promoted"], always["reason"]) == (True, "policy 'always'")
    first = decide("if_better", "roc_auc", CANDIDATE, None)
    assert (first["promoted"], first["reason"]) == (True, "no version was active")


@pytest.mark.parametrize(
    ("active", "promoted"),
    [({"roc_auc": 0.85}, True), ({"roc_auc": 0.9}, True), ({"roc_auc": 0.95}, False)],
)
def test_if_better_promotes_at_least_as_good(active: dict[str, float], promoted: bool) -> None:
    decision = decide("if_better", "roc_auc", CANDIDATE, 2, active)
    assert decision["promoted"] is promoted
    assert (decision["candidate"], decision["active"]) == (0.9, active["roc_auc"])
    assert decision["policy"] == "if_better" and decision["active_version"] == 2


def test_if_better_keeps_a_version_that_cannot_be_compared() -> None:
    decision = decide("if_better", "roc_auc", CANDIDATE, 2, None)
    assert decision["promoted"] is False
    assert "cannot be scored" in decision["reason"]


def test_test_inputs_read_the_same_test_files_at_another_size(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data")
    config = TrainConfig(input_size=32, base_weights=None)
    dataset = load_dataset(root, config)
    assert x_test_at(root, dataset, 32) is dataset.x_test
    # What a second load at 48 px would have given, without loading train/ and val/ again.
    again = load_dataset(root, config.model_copy(update={"input_size": 48}))
    np.testing.assert_array_equal(x_test_at(root, dataset, 48), again.x_test)
    np.testing.assert_array_equal(dataset.y_test, again.y_test)
