"""External validation: a version scored on a registered evaluation set, stored with the version.

Every published version is scored on each registered evaluation set (:mod:`ml.evalset`) at its own
decision rule; the result -- accuracy, sensitivity and specificity with 95% Wilson intervals, the
ROC AUC with a bootstrap interval, the confusion matrix, n -- is written to
``MODEL_DIR/<N>/external/<name>.json`` (temp file + rename: a reader never sees half of one, and
the published ``metadata.json`` is never rewritten). Reading and the warning rule need only JSON
(the web process uses them); scoring imports numpy's evaluation code and, to load a model,
TensorFlow, inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ml.config import EVAL_NAME_PATTERN, check_eval_name
from ml.decision import NEGATIVE_CLASS, negative_index

if TYPE_CHECKING:
    import keras

    from ml.evalset import EvalSet

__all__ = [
    "EXTERNAL_DIR",
    "NAME_PATTERN",
    "check_name",
    "evaluate_on_sets",
    "evaluate_version",
    "read_external",
    "score_eval_set",
    "sensitivity_warning",
    "write_external",
]

log = logging.getLogger(__name__)

EXTERNAL_DIR = "external"
NAME_PATTERN = EVAL_NAME_PATTERN
check_name = check_eval_name

PathLike = str | os.PathLike[str]


# External results have always used z = 1.96 (not ml.intervals.Z_95) and a stratified bootstrap
# of 2,000 resamples (docs/external-validation.md): kept so stored results and re-runs agree.
EXTERNAL_Z = 1.96
EXTERNAL_RESAMPLES = 2000


def _ci(bounds: tuple[float, float] | None) -> list[float] | None:
    return None if bounds is None else [round(bounds[0], 4), round(bounds[1], 4)]


def score_eval_set(
    evalset: EvalSet,
    probs: npt.ArrayLike,
    threshold: float | None,
    target_sensitivity: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Score a version's probabilities on an evaluation set, with 95% intervals (JSON-native)."""
    from ml.evaluation import evaluate_predictions
    from ml.intervals import bootstrap_auc_interval, wilson_interval

    p = np.asarray(probs, dtype=np.float64)
    doc = evaluate_predictions(evalset.y, p, evalset.class_names, threshold=threshold)
    confusion = np.asarray(doc["confusion_matrix"])
    neg = negative_index(evalset.class_names, NEGATIVE_CLASS)
    disease = np.arange(len(evalset.class_names)) != neg
    detected = int(confusion[np.ix_(disease, disease)].sum())
    positives = int(confusion[disease].sum())
    negatives = int(confusion[neg].sum())
    n = int(doc["n"])
    return {
        "n": n,
        "counts": evalset.fingerprint.get("counts", {}),
        "threshold": threshold,
        "target_sensitivity": target_sensitivity,
        "accuracy": doc["accuracy"],
        "accuracy_ci": _ci(wilson_interval(int(np.trace(confusion)), n, z=EXTERNAL_Z)),
        "sensitivity": doc["sensitivity"],
        "sensitivity_ci": _ci(wilson_interval(detected, positives, z=EXTERNAL_Z)),
        "specificity": doc["specificity"],
        "specificity_ci": _ci(wilson_interval(int(confusion[neg, neg]), negatives, z=EXTERNAL_Z)),
        "roc_auc": doc["roc_auc"],
        "roc_auc_ci": _ci(
            bootstrap_auc_interval(
                evalset.y != neg,
                1.0 - p[:, neg],
                resamples=EXTERNAL_RESAMPLES,
                seed=seed,
                stratified=True,
            )
        ),
        "confusion_matrix": doc["confusion_matrix"],
        "class_names": doc["class_names"],
    }


def sensitivity_warning(doc: dict[str, Any], target: float | None = None) -> str | None:
    """A warning when the sensitivity on a set falls short of the target beyond its interval.

    ``target`` defaults to the ``target_sensitivity`` the evaluation recorded (the one the
    version's threshold was chosen for). Short "beyond the interval" = the target lies above the
    95% interval's upper bound: the shortfall is not sampling noise of a small set.
    """
    target = doc.get("target_sensitivity") if target is None else target
    bounds = doc.get("sensitivity_ci")
    if target is None or not bounds or doc.get("sensitivity") is None:
        return None
    if float(target) <= float(bounds[1]):
        return None
    return (
        f"sensitivity {doc['sensitivity']:.3f} (95% CI {bounds[0]:.3f}-{bounds[1]:.3f}) on "
        f"{doc.get('dataset', 'this set')} is below the target {float(target):.3f}"
    )


def external_dir(model_dir: PathLike, version: int) -> Path:
    """The folder of one version's external evaluations."""
    return Path(model_dir) / str(version) / EXTERNAL_DIR


def write_external(model_dir: PathLike, version: int, name: str, doc: dict[str, Any]) -> Path:
    """Store ``doc`` as ``<N>/external/<name>.json`` atomically (temp file + rename)."""
    folder = external_dir(model_dir, version)
    folder.mkdir(mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / f"{check_name(name)}.json")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / f"{name}.json"


def read_external(model_dir: PathLike, version: int) -> dict[str, dict[str, Any]]:
    """Every stored external evaluation of ``version``, by set name (unreadable ones skipped)."""
    folder = external_dir(model_dir, version)
    if not folder.is_dir():
        return {}
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith(".") or not NAME_PATTERN.fullmatch(path.stem):
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("skipping external evaluation %s: %s", path, exc)
            continue
        if isinstance(doc, dict):
            out[path.stem] = doc
    return out


def evaluate_version(
    model_dir: PathLike,
    version: int,
    name: str,
    root: PathLike,
    *,
    model: keras.Model | None = None,
    batch_size: int = 32,
    store: bool = True,
) -> dict[str, Any]:
    """Score ``version`` on the evaluation folder ``root`` registered as ``name``; store it.

    The version is scored as it is served: at its input size and its decision threshold. A set
    that cannot be scored (missing, classes the model does not know) is stored as
    ``{"dataset", "path", "error"}`` so the gap is visible, and returned the same way.
    """
    from ml.dataset import DatasetError
    from ml.evalset import load_eval_folder
    from ml.versions import load_model, read_metadata

    check_name(name)
    meta = read_metadata(model_dir, version)
    started = time.monotonic()
    head: dict[str, Any] = {"dataset": name, "path": os.fspath(root), "version": version}
    try:
        evalset = load_eval_folder(root, meta.class_names, meta.input_size)
    except DatasetError as exc:
        doc = head | {"error": str(exc), "evaluated_at": datetime.now(UTC).isoformat()}
    else:
        if model is None:
            model = load_model(model_dir, version)
        probs = model.predict(evalset.x, batch_size=batch_size, verbose=0)
        target = meta.hyperparameters.get("target_sensitivity")
        doc = head | score_eval_set(evalset, probs, meta.decision_threshold, target)
        doc |= {
            "fingerprint": evalset.fingerprint["sha256"],
            "skipped": len(evalset.skipped),
            "evaluated_at": datetime.now(UTC).isoformat(),
            "seconds": round(time.monotonic() - started, 1),
        }
    if store:
        write_external(model_dir, version, name, doc)
    log.info("version %s on %s: %s", version, name, doc.get("error") or doc.get("roc_auc"))
    return doc


def evaluate_on_sets(
    model_dir: PathLike, version: int, sets: Mapping[str, PathLike]
) -> dict[str, dict[str, Any]]:
    """``version`` scored (and stored) on each set; a set that fails is recorded, not raised."""
    from ml.versions import load_model

    out: dict[str, dict[str, Any]] = {}
    model = None
    for name, path in sorted(sets.items()):
        try:
            if model is None:
                model = load_model(model_dir, version)
            out[name] = evaluate_version(model_dir, version, name, path, model=model)
        except Exception as exc:  # one bad set must not fail a job that already published
            log.exception("external evaluation of version %s on %s failed", version, name)
            out[name] = {"dataset": name, "path": os.fspath(path), "error": str(exc)}
    return out
