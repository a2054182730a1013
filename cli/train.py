"""``python -m cli.train``: one training run on a local dataset folder, written to ``--out``.

Writes ``model.keras``, ``evaluation.json`` (test split), ``history.json``, ``curves.png`` and
``run.json``; publishing a model version is not done here. ``python -m ml.training`` is the
older spelling of the same command::

    python -m cli.train --dataset DATA_DIR --out OUT_DIR --input-size 224
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cli.options import add_options
from ml.config import TrainConfig, TrainingOptions
from ml.dataset import DatasetError, load_dataset
from ml.progress import EpochReport
from ml.training import train

log = logging.getLogger(__name__)

# The knobs a local run has beyond the service's (the base is --base-weights, below).
LOCAL_KNOBS = ("val_fraction", "min_val_images")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m cli.train``."""
    parser = argparse.ArgumentParser(
        prog="python -m cli.train",
        description="Train the VGG16 classifier on a dataset folder and write model.keras, "
        "evaluation.json (test split), history.json, curves.png and run.json into --out. "
        "Publishing a model version is not done here.",
    )
    parser.add_argument("--dataset", type=Path, required=True, help="<root>/{train,val,test}/")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    names = (*TrainingOptions.model_fields, *LOCAL_KNOBS)
    add_options(parser, TrainConfig, names, with_defaults=True)
    parser.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="what the training steps compute in: auto picks bfloat16 on CPUs with AMX or "
        "AVX512-BF16, float16 on Tensor-Core GPUs, else float32 (default auto); the model is "
        "saved in float32 either way",
    )
    parser.add_argument(
        "--base-weights",
        default=TrainConfig.model_fields["base_weights"].default,
        help="'imagenet' (downloads), 'none' (random init), or a VGG16 notop weights file "
        "(default imagenet)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig described by parsed command-line arguments."""
    base = None if str(args.base_weights).lower() == "none" else args.base_weights
    names = (*TrainingOptions.model_fields, *LOCAL_KNOBS)
    return TrainConfig.from_dict({n: getattr(args, n) for n in names} | {"base_weights": base})


def _log_epoch(report: EpochReport) -> None:
    """One progress line per epoch."""
    m = report.metrics
    eta = f"{report.eta_seconds / 60:.1f} min" if report.eta_seconds is not None else "?"
    log.info(
        "epoch %d/%d (phase %d, %d/%d): loss %.4f acc %.4f auc %.4f | "
        "val_loss %.4f val_acc %.4f val_auc %.4f | %.0f s elapsed, ETA %s",
        report.epoch,
        report.total_epochs,
        report.phase,
        report.phase_epoch,
        report.phase_epochs,
        m.get("loss", math.nan),
        m.get("accuracy", math.nan),
        m.get("auc", math.nan),
        m.get("val_loss", math.nan),
        m.get("val_accuracy", math.nan),
        m.get("val_auc", math.nan),
        report.elapsed_seconds,
        eta,
    )


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Train from the command line; return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        dataset = load_dataset(args.dataset, config)
    except DatasetError as exc:
        log.error("%s", exc)
        return 2
    counts = dataset.fingerprint["counts"]
    log.info(
        "dataset %s: classes %s, %s (val: %s), %d skipped, fingerprint %s",
        args.dataset,
        dataset.class_names,
        json.dumps(counts),
        dataset.fingerprint["val_source"],
        len(dataset.skipped),
        dataset.fingerprint["sha256"][:12],
    )
    log.info("config %s", json.dumps(config.to_dict()))
    result = train(config, dataset, on_epoch=_log_epoch, precision=args.precision)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    result.model.save(out / "model.keras")
    _write_json(out / "evaluation.json", result.evaluation)
    _write_json(out / "history.json", result.history)
    (out / "curves.png").write_bytes(result.curves_png)
    import keras
    import tensorflow as tf

    _write_json(
        out / "run.json",
        {
            "config": config.to_dict(),
            "class_names": dataset.class_names,
            "dataset": str(args.dataset),
            "fingerprint": dataset.fingerprint,
            "skipped": dataset.skipped,
            "seconds": round(result.seconds, 1),
            "decision_threshold": result.decision_threshold,
            "precision": result.precision,
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        },
    )
    ev = result.evaluation
    log.info(
        "test split (n=%d): accuracy %.4f sensitivity %s specificity %s ROC AUC %s; "
        "confusion %s; %.0f s; wrote %s",
        ev["n"],
        ev["accuracy"],
        _fmt(ev["sensitivity"]),
        _fmt(ev["specificity"]),
        _fmt(ev["roc_auc"]),
        ev["confusion_matrix"],
        result.seconds,
        out,
    )
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
