"""The in-process cost of Grad-CAM: ``predict_batch`` against ``predict_and_explain``, A/B.

    .venv/bin/python -m bench.explain                      # VGG16 224 px, batches 1, 8, 16
    .venv/bin/python -m bench.explain --size 32 --rounds 5

The two calls alternate on the same batch, round after round, so a machine whose load changes
(other jobs on shared cores) slows both alike; the report gives the median ms of each per batch
size, their ratio, and the gradient pass alone (``gradient_ms``, part of the explained call).
Writes bench/results/explain-<UTC date>.json. The whole-stack cost (the same stack with
``CXR_EXPLAIN=0``) is the ``explain off`` row of ``python -m bench.run``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench.configs import RESULTS, Json
from bench.loadgen import load_images
from bench.stack import make_model


def measure(size: int, batch_sizes: Sequence[int], rounds: int, precision: str) -> Json:
    """Median ms per call of the plain and the explained batch, alternating (imports TF)."""
    import numpy as np

    from ml.explain import predict_and_explain
    from ml.imaging import decode_image, to_model_input
    from ml.precision import choose_precision, detect_hardware
    from ml.versions import load_classifier

    resolved = choose_precision(precision, detect_hardware())
    with tempfile.TemporaryDirectory(prefix="cxr-bench-explain-") as tmp:
        make_model("vgg16", size, Path(tmp))
        clf = load_classifier(Path(tmp), 1, precision=resolved)
    clf.warm_up()
    images, _ = load_images(max(batch_sizes))
    inputs = [to_model_input(decode_image(data), size) for _, data in images]
    rows = []
    for n in batch_sizes:
        x = np.stack([inputs[i % len(inputs)] for i in range(n)])
        wanted = [True] * n
        clf.predict_batch(x)
        predict_and_explain(clf, x, wanted)  # the first call of a shape builds its kernels
        plain, explained, gradient = [], [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            clf.predict_batch(x)
            t1 = time.perf_counter()
            out = predict_and_explain(clf, x, wanted)
            t2 = time.perf_counter()
            assert out.error is None, out.error
            plain.append((t1 - t0) * 1000)
            explained.append((t2 - t1) * 1000)
            gradient.append((out.seconds or 0.0) * 1000)
        p, e = statistics.median(plain), statistics.median(explained)
        rows.append(
            {
                "batch_size": n,
                "rounds": rounds,
                "plain_ms": round(p, 1),
                "explained_ms": round(e, 1),
                "ratio": round(e / p, 3),
                # The gradient pass alone (decision rule + head gradient + maps), inside e.
                "gradient_ms": round(statistics.median(gradient), 2),
                "plain_images_per_s": round(n / p * 1000, 2),
                "explained_images_per_s": round(n / e * 1000, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {"input_size": size, "precision": resolved, "layer": "block5_conv3", "rows": rows}


def main(argv: Sequence[str] | None = None) -> None:
    """Parse options, measure, print and save."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=224, help="model input side (px)")
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--rounds", type=int, default=7, help="A/B rounds per batch size")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    started = datetime.now(UTC)
    report = measure(args.size, sizes, args.rounds, args.precision)
    report["started_at"] = started.isoformat(timespec="seconds")
    given = sys.argv[1:] if argv is None else list(argv)
    report["command"] = " ".join(["python -m bench.explain", *given])
    out = RESULTS / f"explain-{started:%Y-%m-%d}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
