"""``python -m bench.ablation``: score trained models (the arms of an ablation) side by side.

Each arm is a ``cli.train --out`` folder (its ``model.keras`` and ``evaluation.json``, whose
``threshold`` the trainer chose on the validation split with ``--target-sensitivity``). Every arm
is scored at that one threshold on the validation split, on the dataset's own test split and on
each ``--external`` set: accuracy, sensitivity, specificity with 95% Wilson intervals, ROC AUC
with a bootstrap interval (``ml.external.score_eval_set``, as the service scores its versions).

The external sets (``cxr-kaggle-test-256`` above all) are TEST SETS ONLY: they are read here to
report, never to choose a threshold, a recipe or an epoch. The recipe is chosen on val.

    python -m bench.ablation --dataset "$CXR_TEST_DATA_DIR" \\
        --arm baseline=/tmp/arm-base --arm sites=/tmp/arm-sites \\
        --external kaggle-test=../shared/data/cxr-kaggle-test-256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.machine import machine

RESULTS = Path(__file__).resolve().parent / "results"


def _pair(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def score_arm(
    folder: Path, sets: dict[str, Path], batch_size: int = 32
) -> dict[str, dict[str, Any]]:
    """One trained arm on every set, at the threshold its trainer chose on val."""
    from ml.evalset import load_eval_folder
    from ml.external import score_eval_set
    from ml.versions import read_keras

    evaluation = json.loads((folder / "evaluation.json").read_text())
    threshold = evaluation.get("threshold")
    model = read_keras(folder / "model.keras")
    size = int(model.input_shape[1])
    out: dict[str, dict[str, Any]] = {}
    for name, root in sets.items():
        evalset = load_eval_folder(root, list(evaluation["class_names"]), size)
        probs = model.predict(evalset.x, batch_size=batch_size, verbose=0)
        out[name] = score_eval_set(evalset, probs, threshold) | {"path": os.fspath(root)}
    return out


def _cell(doc: dict[str, Any], key: str) -> str:
    value, ci = doc.get(key), doc.get(f"{key}_ci")
    if value is None:
        return "-"
    if key == "roc_auc":
        text = f"{value:.3f}"
        return text if not ci else f"{text} [{ci[0]:.3f}-{ci[1]:.3f}]"
    text = f"{100 * value:.1f}%"
    return text if not ci else f"{text} [{100 * ci[0]:.1f}-{100 * ci[1]:.1f}]"


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The Markdown table: one row per arm and set."""
    lines = [
        "| arm | set | n | accuracy | sensitivity | specificity | ROC AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, sets in results.items():
        for name, doc in sets.items():
            cells = [_cell(doc, k) for k in ("accuracy", "sensitivity", "specificity", "roc_auc")]
            lines.append(f"| {arm} | {name} | {doc['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Score the arms, print the table, save ``bench/results/ablation-<date>.json``."""
    parser = argparse.ArgumentParser(prog="python -m bench.ablation", description=__doc__)
    parser.add_argument("--dataset", required=True, help="the training data set (val/, test/)")
    parser.add_argument("--arm", type=_pair, action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--external", type=_pair, action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/...)")
    args = parser.parse_args(argv)
    data = Path(args.dataset)
    sets = {"val": data / "val", "test": data / "test"} | dict(args.external)
    started = time.monotonic()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    runs: dict[str, Any] = {}
    for name, folder in args.arm:
        results[name] = score_arm(folder, sets)
        run = folder / "run.json"
        runs[name] = json.loads(run.read_text()) if run.is_file() else None
    print(table(results))
    doc = {
        "command": "python -m bench.ablation " + " ".join(argv or sys.argv[1:]),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "machine": machine(),
        "note": "thresholds chosen on val by the trainer; external sets are test sets only",
        "results": results,
        "runs": runs,
    }
    out = args.out or RESULTS / f"ablation-{datetime.now(UTC):%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
