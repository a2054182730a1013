"""``python -m bench.gap``: why a worker's model call can cost more than the raw call.

The stack's in-worker batch time was up to 2.2x the raw ``predict_batch`` time at the same batch
size (issue 9). Each scenario below runs VGG16 (random weights) in a fresh subprocess, in one
precision, and times batches of ``--batch`` images:

- ``steady``: the same batch size call after call (what ``bench.raw`` measures).
- ``mixed``: batch sizes drawn at random from 1..``--max-batch`` (what dynamic batching gives);
  the per-image time is taken from the calls of size ``--batch`` only. Also the RSS growth.
- ``explain``: the batch with Grad-CAM maps (the service's default, ``CXR_EXPLAIN``).
- ``busy``: ``steady`` while ``--threads`` Python threads decode and resize real X-rays in a loop,
  as a worker's task threads do beside the model thread.
- ``bucketed``: ``mixed``, but each batch padded up to the next allowed size (1, 2, 4, 8, 16, ...),
  so only a handful of shapes ever reach TensorFlow.

It prints a table and saves ``bench/results/gap-<date>.json`` with the CPU model and flags.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.machine import machine

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ("steady", "mixed", "bucketed", "explain", "busy")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One scenario in this process (imports TensorFlow)."""
    import numpy as np

    from bench.loadgen import load_images
    from ml.imaging import decode_image, to_model_input
    from ml.model import Classifier, build_classifier
    from ml.precision import with_precision

    model = with_precision(build_classifier(["NORMAL", "PNEUMONIA"], 224, None), args.precision)
    clf = Classifier(model, ["NORMAL", "PNEUMONIA"], version=1)
    clf.warm_up()
    images, _ = load_images(32)
    inputs = [to_model_input(decode_image(data), 224) for _, data in images]
    rng = np.random.default_rng(0)
    stop = threading.Event()

    def busy() -> None:
        i = 0
        while not stop.is_set():
            to_model_input(decode_image(images[i % len(images)][1]), 224)
            i += 1

    def padded(n: int) -> int:
        size = 1
        while size < n:
            size *= 2
        return min(size, args.max_batch)

    def call(n: int) -> float:
        x = np.stack([inputs[i % len(inputs)] for i in range(n)])
        if args.scenario == "bucketed":
            x = np.concatenate([x, np.zeros((padded(n) - n, *x.shape[1:]), x.dtype)])
        started = time.perf_counter()
        if args.scenario == "explain":
            from ml.explain import predict_and_explain

            predict_and_explain(clf, x, [True] * n)
        else:
            clf.predict_batch(x)
        return time.perf_counter() - started

    call(args.batch)  # the first call of this shape
    threads = []
    if args.scenario == "busy":
        threads = [threading.Thread(target=busy, daemon=True) for _ in range(args.threads)]
        for t in threads:
            t.start()
    rss_before = _rss_mib()
    times: list[float] = []
    first_of_shape: list[float] = []
    seen: set[int] = {args.batch}
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline or len(times) < 3:
        if args.scenario in ("mixed", "bucketed"):
            n = int(rng.integers(1, args.max_batch + 1))
            shape = padded(n) if args.scenario == "bucketed" else n
            elapsed = call(n)
            if shape not in seen:
                seen.add(shape)
                first_of_shape.append(elapsed)
            if n != args.batch:
                continue
        else:
            elapsed = call(args.batch)
        times.append(elapsed)
    stop.set()
    ms = sorted(1000 * t for t in times)
    return {
        "scenario": args.scenario,
        "precision": args.precision,
        "batch_size": args.batch,
        "calls": len(ms),
        "ms_per_call_median": round(ms[len(ms) // 2], 1),
        "ms_per_image_median": round(ms[len(ms) // 2] / args.batch, 1),
        "images_per_s": round(args.batch * 1000 / ms[len(ms) // 2], 2),
        "shapes_seen": len(seen),
        "first_call_of_new_shape_ms_median": (
            round(1000 * sorted(first_of_shape)[len(first_of_shape) // 2], 1)
            if first_of_shape
            else None
        ),
        "rss_growth_mib": round(_rss_mib() - rss_before, 1),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("TF_", "OMP_", "ONEDNN"))},
    }


def main(argv: list[str] | None = None) -> int:
    """Run every scenario and precision in its own subprocess; print and save the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.gap", description=__doc__)
    parser.add_argument("--precision", default="float32,bfloat16")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--child", metavar="SCENARIO", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.scenario = args.child
        print(json.dumps(child(args)))
        return 0
    rows = []
    for precision in args.precision.split(","):
        for scenario in args.scenarios.split(","):
            cmd = [sys.executable, "-m", "bench.gap", "--child", scenario, "--precision",
                   precision, "--batch", str(args.batch), "--max-batch", str(args.max_batch),
                   "--threads", str(args.threads), "--seconds", str(args.seconds)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{precision:9} {scenario:9} batch {row['batch_size']:2}: "
                f"{row['ms_per_call_median']:8.1f} ms/call {row['images_per_s']:6.1f} img/s "
                f"shapes {row['shapes_seen']:2} first-of-shape "
                f"{row['first_call_of_new_shape_ms_median']} ms  RSS +{row['rss_growth_mib']} MiB",
                flush=True,
            )
    doc = {
        "command": "python -m bench.gap " + " ".join(argv if argv is not None else sys.argv[1:]),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "rows": rows,
    }
    out_path = RESULTS / f"gap-{datetime.now(UTC):%Y-%m-%d}.json"
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"saved {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
