"""Raw model throughput: ``Classifier.predict_batch`` per batch size, in a fresh subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.configs import Json
from bench.loadgen import load_images
from bench.stack import (
    ROOT,
)

# --- raw model throughput (subprocess) ------------------------------------------------------


def raw_throughput_child(
    model_dir: Path,
    batch_sizes: Sequence[int],
    min_seconds: float,
    min_calls: int,
    precision: str = "auto",
) -> Json:
    """Time ``Classifier.predict_batch`` per batch size; runs in its own process (imports TF)."""
    import numpy as np
    import tensorflow as tf

    from ml.imaging import decode_image, to_model_input
    from ml.precision import choose_precision, detect_hardware
    from ml.versions import load_classifier

    resolved = choose_precision(precision, detect_hardware())
    clf = load_classifier(model_dir, 1, precision=resolved)
    clf.warm_up()
    images, _ = load_images(max(batch_sizes))
    inputs = [to_model_input(decode_image(data), clf.input_size) for _, data in images]
    rows = []
    for n in batch_sizes:
        x = np.stack([inputs[i % len(inputs)] for i in range(n)])
        clf.predict_batch(x)  # warm-up: the first call of a shape builds its kernels
        calls, started = 0, time.perf_counter()
        while calls < min_calls or time.perf_counter() - started < min_seconds:
            clf.predict_batch(x)
            calls += 1
        elapsed = time.perf_counter() - started
        rows.append(
            {
                "batch_size": n,
                "calls": calls,
                "ms_per_call": round(elapsed / calls * 1000, 3),
                "images_per_s": round(n * calls / elapsed, 2),
            }
        )
    best = max(rows, key=lambda r: float(r["images_per_s"]))
    return {
        "tf_version": tf.__version__,
        "precision": resolved,
        "by_batch_size": rows,
        "best_images_per_s": best["images_per_s"],
        "best_batch_size": best["batch_size"],
        "batch1_ms": rows[0]["ms_per_call"] if rows[0]["batch_size"] == 1 else None,
    }


def raw_throughput(
    model_dir: Path,
    batch_sizes: Sequence[int],
    min_s: float,
    min_calls: int,
    precision: str = "auto",
) -> Json:
    """Run :func:`raw_throughput_child` in a fresh interpreter and return its report."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--raw-throughput", str(model_dir),
         "--batch-sizes", ",".join(map(str, batch_sizes)), "--raw-min-seconds", str(min_s),
         "--raw-min-calls", str(min_calls), "--precision", precision],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"raw throughput failed:\n{proc.stderr[-3000:]}")
    report: Json = json.loads(proc.stdout.strip().splitlines()[-1])
    return report
