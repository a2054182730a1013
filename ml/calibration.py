"""Decision thresholds: choosing one on the val split, and republishing a version with one.

A threshold on ``1 - p(NORMAL)`` reaching a stated sensitivity (:mod:`ml.decision` owns the
rule) is chosen on the validation split and used to label the test split. TensorFlow is reached
only through the model passed in (and :mod:`ml.versions` when loading one).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from ml.config import TrainConfig
from ml.dataset import Dataset, DatasetError, load_dataset
from ml.decision import negative_index, threshold_for_sensitivity
from ml.evaluation import evaluate_model
from ml.ood import DEFAULT_ACCEPTANCE, fit_gate

if TYPE_CHECKING:
    import keras

    from ml.versions import ModelMetadata

__all__ = ["calibrate_version", "choose_threshold"]

log = logging.getLogger(__name__)


def choose_threshold(
    model: keras.Model, dataset: Dataset, target_sensitivity: float, batch_size: int = 32
) -> float | None:
    """The decision threshold reaching ``target_sensitivity`` on ``dataset``'s val split."""
    probs = model.predict(dataset.x_val, batch_size=batch_size, verbose=0)
    negative = negative_index(dataset.class_names)
    threshold = threshold_for_sensitivity(dataset.y_val, probs, negative, target_sensitivity)
    log.info("decision threshold %s: val sensitivity >= %g", threshold, target_sensitivity)
    return threshold


def calibrate_version(
    model_dir: os.PathLike[str] | str,
    version: int,
    dataset_root: os.PathLike[str] | str,
    target_sensitivity: float,
    ood_acceptance: float = DEFAULT_ACCEPTANCE,
) -> ModelMetadata:
    """Publish ``version``'s weights again with a decision threshold for ``target_sensitivity``.

    The out-of-distribution gate is fitted again on the same dataset (ml.ood), its threshold
    accepting ``ood_acceptance`` of the val split.

    The threshold is chosen on the dataset's val split (split off train the way the version's
    own training did, when its hyperparameters say how) and the test split is evaluated at it.
    The new version names ``version`` as its parent and is a candidate: promote it to serve it.

    Raises:
        DatasetError: the dataset cannot be used, or its classes differ from the version's.
        ValueError: the val split has no image of a finding to calibrate on.
    """
    from ml.versions import curves_path, load_model, read_metadata, save_version

    meta = read_metadata(model_dir, version)
    defaults = TrainConfig()
    hp = meta.hyperparameters
    config = TrainConfig(
        input_size=meta.input_size,
        base_weights=None,
        seed=int(hp.get("seed", defaults.seed)),
        val_fraction=float(hp.get("val_fraction", defaults.val_fraction)),
        min_val_images=int(hp.get("min_val_images", defaults.min_val_images)),
        target_sensitivity=target_sensitivity,
    )
    dataset = load_dataset(dataset_root, config)
    if dataset.class_names != meta.class_names:
        raise DatasetError(
            f"the dataset's classes {dataset.class_names} are not version {version}'s "
            f"{meta.class_names}"
        )
    model = load_model(model_dir, version)
    threshold = choose_threshold(model, dataset, target_sensitivity, config.batch_size)
    if threshold is None:
        raise ValueError("the val split has no image of a finding: nothing to calibrate on")
    evaluation = evaluate_model(
        model, dataset.x_test, dataset.y_test, dataset.class_names, config.batch_size, threshold
    )
    curves = curves_path(model_dir, version)
    gate, ood = fit_gate(model, dataset, ood_acceptance, config.batch_size)
    return save_version(
        model,
        model_dir,
        class_names=meta.class_names,
        base_weights=f"version {version}",
        parent_version=version,
        hyperparameters={**hp, "target_sensitivity": target_sensitivity},
        dataset=dataset.fingerprint,
        training_seconds=meta.training_seconds,
        evaluation=evaluation,
        curves_png=curves.read_bytes() if curves is not None else None,
        decision_threshold=threshold,
        extra={"calibrated_from": version},
        ood_gate=gate,
        ood=ood,
        # New labels on the same weights: trained exactly when its parent was.
        trained=meta.trained,
    )
