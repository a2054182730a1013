"""Model cards: a published version's card matches its metadata and evaluation, by section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml.evaluation import evaluate_predictions
from ml.intervals import bootstrap_auc_interval, wilson_interval
from ml.model_card import CARD_FILE, build_card, card_html, card_markdown

CLASSES = ["NORMAL", "PNEUMONIA"]


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(8, 10) or (0, 0)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 0) is None
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)  # type: ignore[index]


def test_bootstrap_auc_interval_brackets_the_auc() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200).astype(bool)
    s = y * 0.5 + rng.normal(0, 0.4, 200)
    low, high = bootstrap_auc_interval(y, s) or (0, 0)
    from ml.evaluation import roc_auc

    assert low < (roc_auc(y, s) or 0) < high and high - low < 0.2
    assert bootstrap_auc_interval(np.ones(5, bool), np.arange(5)) is None


@pytest.fixture
def version(tmp_path: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    from ml.model import build_standin_classifier
    from ml.versions import save_version

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    p1 = np.clip(y * 0.6 + rng.uniform(0, 0.5, 120), 0, 1)
    evaluation = evaluate_predictions(y, np.stack([1 - p1, p1], axis=1), CLASSES, threshold=0.4)
    counts = {"NORMAL": 50, "PNEUMONIA": 70}
    meta = save_version(
        build_standin_classifier(CLASSES, 32),
        tmp_path,
        class_names=CLASSES,
        base_weights="imagenet",
        parent_version=None,
        hyperparameters={"epochs_head": 3, "target_sensitivity": 0.95, "seed": 7},
        dataset={
            "path": "cxr-pneumonia-256",
            "sha256": "ab" * 32,
            "files": 360,
            "counts": {"train": counts, "val": counts, "test": counts},
        },
        evaluation=evaluation,
        decision_threshold=0.4,
        ood={"method": "mahalanobis", "threshold": 812.5, "target_acceptance": 0.99,
             "val_acceptance": 0.991, "test_acceptance": 0.987},
    )  # fmt: skip
    return tmp_path, meta.to_dict(), evaluation


def test_the_published_card_matches_metadata_and_evaluation(
    version: tuple[Path, dict[str, Any], dict[str, Any]],
) -> None:
    model_dir, meta, evaluation = version
    markdown = (model_dir / str(meta["version"]) / CARD_FILE).read_text()
    audit = [
        {"at": "2026-12-02T10:00:00", "actor": "admin:alice", "action": "promote",
         "from_version": None, "to_version": meta["version"], "reason": "first"},
        {"at": "2026-12-02T11:00:00", "actor": "admin", "action": "promote",
         "from_version": 5, "to_version": 6, "reason": ""},
    ]  # fmt: skip
    card = build_card(meta, evaluation, audit)
    json.dumps(card)  # JSON-native
    d = card["model_details"]
    assert d["version"] == meta["version"] and d["base_weights"] == "imagenet"
    assert d["parent_version"] is None and d["classes"] == CLASSES
    data = card["training_data"]
    assert data["fingerprint"] == "ab" * 32 and data["class_counts"] == meta["dataset"]["counts"]
    assert "Guangzhou" in data["population"] and "1-5" in data["population"]
    assert card["training_config"] == meta["hyperparameters"]
    for name in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        m = card["metrics"][name]
        assert m["value"] == evaluation[name]
        low, high = m["ci95"]
        assert low <= evaluation[name] <= high
    assert card["metrics"]["roc_auc"]["interval"] == "bootstrap"
    assert card["metrics"]["accuracy"]["interval"] == "wilson"
    hits = np.trace(evaluation["confusion_matrix"])
    assert card["metrics"]["accuracy"]["ci95"] == pytest.approx(
        list(wilson_interval(int(hits), evaluation["n"]) or ())
    )
    assert card["confusion_matrix"]["rows_true_columns_predicted"] == evaluation["confusion_matrix"]
    assert card["operating_point"]["decision_threshold"] == 0.4
    assert "0.95" in card["operating_point"]["chosen"]
    assert card["ood_gate"]["method"] == "mahalanobis"
    assert card["ood_gate"]["test_acceptance"] == 0.987
    assert [e["actor"] for e in card["promotions"]] == ["admin:alice"]
    limits = " ".join(card["limits"] + card["intended_use"])
    for phrase in ("not a medical device", "lateral", "follow-up", "paediatric"):
        assert phrase in limits
    # The Markdown in the folder is the same card (written at publish, with no audit yet).
    assert markdown == card_markdown(build_card(meta, evaluation, []))
    assert "## Metrics (test split, 95% intervals)" in markdown
    assert "ab" * 32 in markdown and "- none recorded" in markdown
    assert "admin:alice" in card_markdown(card)


def test_a_version_without_evaluation_or_gate_says_so() -> None:
    meta = {
        "version": 1, "class_names": CLASSES, "input_size": 224, "base_weights": None,
        "ood": {"method": "none", "why": "no dataset was given"}, "extra": {"trained": False},
    }  # fmt: skip
    card = build_card(meta, None)
    assert card["ood_gate"]["method"] == "none" and "no dataset" in card["ood_gate"]["why_none"]
    assert any("never trained" in t for t in card["limits"])
    text = card_markdown(card)
    assert "gate: none" in text and "Not evaluated." in text
    assert "population: not recorded" in text.lower()


@pytest.mark.parametrize(
    ("fields", "evaluated", "trained"),
    [
        ({"trained": True, "extra": {"imported_from": "notebook.keras"}}, False, True),
        ({"trained": False}, True, False),  # `cxr import --untrained`, then `cxr evaluate`
        ({"extra": {"imported_from": "notebook.keras"}}, False, True),  # before `trained`
        ({"training_seconds": 12.5}, False, True),  # before `trained`: a timed run
        ({}, False, False),  # before `trained`: a bare save of a fresh model
    ],
)
def test_trained_is_the_registrys_word_not_whether_an_evaluation_exists(
    fields: dict[str, Any], evaluated: bool, trained: bool
) -> None:
    from ml.versions import ModelMetadata

    meta = {"version": 3, "class_names": CLASSES, "input_size": 32, "base_weights": None}
    meta |= fields
    evaluation = evaluate_predictions([0, 1, 1], [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], CLASSES)
    card = build_card(meta, evaluation if evaluated else None)
    assert card["model_details"]["trained"] is trained is ModelMetadata.from_dict(meta).trained
    assert any("never trained" in t for t in card["limits"]) is not trained
    assert f"- **trained**: {trained}" in card_markdown(card)


def test_html_escapes_what_it_shows() -> None:
    meta = {"version": 2, "class_names": ["<b>A", "B"], "input_size": 32, "base_weights": None}
    page = card_html(build_card(meta, None))
    assert "<b>A" not in page and "&lt;b&gt;A" in page and "<h2>Intended use</h2>" in page
