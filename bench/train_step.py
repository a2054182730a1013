"""``python -m bench.train_step``: training throughput of the whole VGG16 per precision.

The step the fine-tuning jobs run (``ml.training``: all 5 blocks trainable, Adam, sparse
categorical cross-entropy, float32 variables under a mixed policy), on random 128 px images, in a
fresh subprocess per precision, after ``--warmup`` steps. Prints a table and saves
``bench/results/train-step-<date>.json`` with the CPU model and flags.

    python -m bench.train_step --precision float32,bfloat16 --steps 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.machine import machine

RESULTS = Path(__file__).resolve().parent / "results"


def child(precision: str, size: int, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """Time ``steps`` training steps in this process (imports TensorFlow)."""
    import keras
    import numpy as np

    from ml.model import build_classifier
    from ml.precision import with_precision

    # As ml.training does: built in float32, rebuilt in the precision (variables stay float32).
    model = with_precision(build_classifier(["NORMAL", "PNEUMONIA"], size, None), precision)
    for layer in model.layers:
        layer.trainable = True
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 1)).astype(np.float32)
    y = rng.integers(0, 2, batch)
    for _ in range(warmup):
        model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - started)
    median = sorted(times)[len(times) // 2]
    return {
        "precision": precision,
        "input_size": size,
        "batch_size": batch,
        "steps": steps,
        "s_per_step_median": round(median, 3),
        "images_per_s": round(batch / median, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Run each precision in its own subprocess; print and save the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__)
    parser.add_argument("--precision", default="float32,bfloat16")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        row = child(args.child, args.input_size, args.batch_size, args.steps, args.warmup)
        print(json.dumps(row))
        return 0
    rows = []
    for precision in args.precision.split(","):
        cmd = [sys.executable, "-m", "bench.train_step", "--child", precision,
               "--input-size", str(args.input_size), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{precision:9} {row['input_size']} px batch {row['batch_size']}: "
            f"{row['s_per_step_median']:.3f} s/step  {row['images_per_s']:.1f} img/s",
            flush=True,
        )
    doc = {
        "command": "python -m bench.train_step "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "rows": rows,
    }
    out_path = RESULTS / f"train-step-{datetime.now(UTC):%Y-%m-%d}.json"
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"saved {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
