"""External validation, unit level: intervals, the evaluation-folder loader, scoring, storing,
the sensitivity warning, the promotion gate and the CXR_EVAL_DATASETS syntax."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ml.dataset import DatasetError
from ml.evalset import eval_root, load_eval_folder
from ml.external import (
    EXTERNAL_Z,
    read_external,
    score_eval_set,
    sensitivity_warning,
    write_external,
)
from ml.intervals import bootstrap_auc_interval, wilson_interval
from ml.promotion import apply_external_gate, external_gate
from worker.settings import parse_eval_datasets

CLASSES = ["NORMAL", "PNEUMONIA"]


def image(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (40, 30), value).save(buffer, "PNG")
    return buffer.getvalue()


def make_folder(root: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{name}-{i}.png").write_bytes(image(40 + 10 * i))
    return root


# --- intervals ----------------------------------------------------------------------------------


def test_wilson_matches_known_values() -> None:
    lo, hi = wilson_interval(5, 10, EXTERNAL_Z)  # type: ignore[misc]
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = wilson_interval(0, 10, EXTERNAL_Z)  # type: ignore[misc]
    assert lo == 0.0 and round(hi, 4) == 0.2775
    lo, hi = wilson_interval(10, 10, EXTERNAL_Z)  # type: ignore[misc]
    assert round(lo, 4) == 0.7225 and hi == 1.0
    assert wilson_interval(0, 0, EXTERNAL_Z) is None
    with pytest.raises(ValueError):
        wilson_interval(11, 10, EXTERNAL_Z)


def test_bootstrap_auc_is_seeded_and_brackets_the_auc() -> None:
    rng = np.random.default_rng(1)
    labels = np.array([0] * 60 + [1] * 60, bool)
    scores = np.where(labels, rng.normal(1, 1, 120), rng.normal(0, 1, 120))
    from ml.evaluation import roc_auc

    def stratified(y: Any, s: Any, resamples: int = 500) -> tuple[float, float] | None:
        return bootstrap_auc_interval(y, s, resamples, seed=3, stratified=True)

    auc = roc_auc(labels, scores)
    lo, hi = stratified(labels, scores)  # type: ignore[misc]
    assert lo < auc < hi and 0.05 < hi - lo < 0.4  # type: ignore[operator]
    assert stratified(labels, scores) == (lo, hi)
    assert stratified(labels, np.where(labels, 1.0, 0.0), 50) == (1.0, 1.0)
    assert stratified(np.ones(5, bool), np.arange(5)) is None


# --- the loader ---------------------------------------------------------------------------------


def test_loader_reads_top_level_class_folders(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "set", {"NORMAL": 3, "PNEUMONIA": 2})
    (root / "NORMAL" / "broken.png").write_bytes(b"not an image")
    evalset = load_eval_folder(root, CLASSES, 32)
    assert evalset.x.shape == (5, 32, 32, 1) and evalset.x.dtype == np.float32
    assert evalset.y.tolist() == [0, 0, 0, 1, 1]
    assert evalset.skipped == ["NORMAL/broken.png"]
    assert evalset.fingerprint["counts"] == {"NORMAL": 3, "PNEUMONIA": 2}
    assert evalset.fingerprint["files"] == 5


def test_loader_reads_only_test_of_a_kaggle_layout(tmp_path: Path) -> None:
    make_folder(tmp_path / "kaggle" / "train", {"NORMAL": 4, "PNEUMONIA": 4})
    make_folder(tmp_path / "kaggle" / "test", {"NORMAL": 1, "PNEUMONIA": 2})
    assert eval_root(tmp_path / "kaggle") == tmp_path / "kaggle" / "test"
    evalset = load_eval_folder(tmp_path / "kaggle", CLASSES, 32)
    assert evalset.files == ["NORMAL/NORMAL-0.png", "PNEUMONIA/PNEUMONIA-0.png",
                             "PNEUMONIA/PNEUMONIA-1.png"]  # fmt: skip


def test_loader_labels_by_the_models_classes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "set", {"NORMAL": 1, "PNEUMONIA": 1})
    evalset = load_eval_folder(root, ["COVID19", "NORMAL", "PNEUMONIA"], 32)
    assert evalset.y.tolist() == [1, 2]


@pytest.mark.parametrize(
    "counts", [{"NORMAL": 1}, {"NORMAL": 1, "TUBERCULOSIS": 1}, {"NORMAL": 0, "PNEUMONIA": 0}]
)
def test_loader_refuses_what_it_cannot_score(tmp_path: Path, counts: dict[str, int]) -> None:
    root = make_folder(tmp_path / "set", counts)
    with pytest.raises(DatasetError):
        load_eval_folder(root, CLASSES, 32)
    with pytest.raises(DatasetError, match="does not exist"):
        load_eval_folder(tmp_path / "missing", CLASSES, 32)


# --- scoring, storing, warning ------------------------------------------------------------------


def scored(tmp_path: Path, target: float | None = 0.95) -> dict[str, Any]:
    root = make_folder(tmp_path / "set", {"NORMAL": 4, "PNEUMONIA": 6})
    evalset = load_eval_folder(root, CLASSES, 32)
    # p(PNEUMONIA): normals 0.1 0.2 0.6 0.3; pneumonias 0.9 0.8 0.4 0.7 0.2 0.95
    p = np.array([0.1, 0.2, 0.6, 0.3, 0.9, 0.8, 0.4, 0.7, 0.2, 0.95])
    return score_eval_set(evalset, np.stack([1 - p, p], axis=1), 0.5, target)


def test_scoring_at_the_versions_threshold_with_intervals(tmp_path: Path) -> None:
    doc = scored(tmp_path)
    assert doc["n"] == 10 and doc["threshold"] == 0.5
    assert doc["confusion_matrix"] == [[3, 1], [2, 4]]
    assert doc["sensitivity"] == pytest.approx(4 / 6) and doc["specificity"] == 0.75
    assert doc["accuracy"] == 0.7
    for key, (k, n) in {
        "sensitivity_ci": (4, 6),
        "specificity_ci": (3, 4),
        "accuracy_ci": (7, 10),
    }.items():
        assert doc[key] == [round(b, 4) for b in wilson_interval(k, n, EXTERNAL_Z)]  # type: ignore[union-attr]
    lo, hi = doc["roc_auc_ci"]
    assert lo <= doc["roc_auc"] <= hi
    json.dumps(doc)  # JSON-native


def test_warning_only_when_the_target_is_above_the_interval(tmp_path: Path) -> None:
    doc = scored(tmp_path) | {"dataset": "site"}
    # sensitivity 4/6, Wilson 95% interval ~[0.30, 0.90]: 0.95 is above it, 0.85 inside.
    assert "below the target 0.950" in (sensitivity_warning(doc) or "")
    assert "site" in (sensitivity_warning(doc) or "")
    assert sensitivity_warning(doc, 0.85) is None
    assert sensitivity_warning(doc | {"target_sensitivity": None}) is None  # argmax: no target
    assert sensitivity_warning({"error": "no folder"}, 0.95) is None


def test_results_are_stored_atomically_beside_the_version(tmp_path: Path) -> None:
    (tmp_path / "3").mkdir()
    write_external(tmp_path, 3, "kaggle-test", {"n": 1})
    write_external(tmp_path, 3, "kaggle-test", {"n": 2})
    write_external(tmp_path, 3, "site.b", {"n": 3})
    (tmp_path / "3" / "external" / "broken.json").write_text("{")
    assert read_external(tmp_path, 3) == {"kaggle-test": {"n": 2}, "site.b": {"n": 3}}
    assert sorted(p.name for p in (tmp_path / "3" / "external").iterdir()) == [
        "broken.json", "kaggle-test.json", "site.b.json"]  # fmt: skip
    assert read_external(tmp_path, 4) == {}
    for bad in ("../x", ".hidden", "", "a/b", "x" * 65):
        with pytest.raises(ValueError):
            write_external(tmp_path, 3, bad, {})


# --- the promotion gate -------------------------------------------------------------------------


def ext(auc: float | None, sens: float | None) -> dict[str, Any]:
    return {"roc_auc": auc, "sensitivity": sens}


def test_gate_passes_within_the_tolerance() -> None:
    gate = external_gate({"a": ext(0.88, 0.80)}, {"a": ext(0.90, 0.84)}, 4, 0.05)
    assert gate["blocked_by"] is None and gate["reason"] is None
    assert [c["ok"] for c in gate["checks"]] == [True, True]


def test_gate_names_the_set_that_blocks() -> None:
    candidate = {"a": ext(0.95, 0.9), "b": ext(0.80, 0.9)}
    gate = external_gate(candidate, {"a": ext(0.9, 0.9), "b": ext(0.9, 0.9)}, 4, 0.05)
    assert gate["blocked_by"] == "b"
    assert "roc_auc 0.8 on 'b'" in gate["reason"] and "version 4" in gate["reason"]
    gate = external_gate({"a": ext(0.9, 0.5)}, {"a": ext(0.9, 0.9)}, 4, 0.05)
    assert gate["blocked_by"] == "a" and gate["reason"].startswith("sensitivity 0.5")


def test_gate_blocks_an_unscored_candidate_and_skips_what_the_active_lacks() -> None:
    gate = external_gate({"a": {"error": "no folder"}}, {"a": ext(0.9, 0.9)}, 4, 0.05)
    assert gate["blocked_by"] == "a" and "could not be evaluated" in gate["reason"]
    gate = external_gate({"new": ext(0.1, 0.1)}, {}, 4, 0.05)
    assert gate["blocked_by"] is None and gate["checks"] == []
    assert external_gate({"a": ext(0.0, 0.0)}, {"a": ext(1.0, 1.0)}, 4, 1.0)["blocked_by"] is None


def test_only_an_if_better_promotion_is_gated() -> None:
    gate = external_gate({"a": ext(0.5, 0.5)}, {"a": ext(0.9, 0.9)}, 4, 0.05)
    better = {"policy": "if_better", "promoted": True, "reason": "roc_auc 0.99 >= 0.9"}
    out = apply_external_gate(better, gate)
    assert out["promoted"] is False and out["external"]["blocked_by"] == "a"
    assert out["reason"].startswith("blocked by evaluation set 'a'")
    always = apply_external_gate({"policy": "always", "promoted": True, "reason": "x"}, gate)
    assert always["promoted"] is True and always["external"] == gate


# --- configuration ------------------------------------------------------------------------------


def test_eval_datasets_setting_syntax() -> None:
    assert parse_eval_datasets("") == {}
    assert parse_eval_datasets('{"kaggle": "/data/k", "site": "site-a"}') == {
        "kaggle": "/data/k", "site": "site-a"}  # fmt: skip
    assert parse_eval_datasets(" kaggle=/data/k , site=site-a,") == {
        "kaggle": "/data/k", "site": "site-a"}  # fmt: skip
    for bad in ("kaggle", '{"../x": "p"}', '["p"]', "a=", "{", '{"a": 1}'):
        with pytest.raises(ValueError):
            parse_eval_datasets(bad)
