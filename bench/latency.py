"""Unloaded end-to-end latency of one prediction (upload → result) at a given model size.

    .venv/bin/python -m bench.latency --input-size 224 --requests 30

Starts its own stack on 127.0.0.1, sends one upload at a time and polls every 5 ms, then prints
a table and writes bench/results/latency-<size>px.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import requests

from bench.stack import ROOT, run_stack


def sample_image() -> tuple[str, bytes]:
    """A real X-ray from $CXR_TEST_DATA_DIR when set, else the first image found beside it."""
    root = Path(os.environ.get("CXR_TEST_DATA_DIR", ROOT.parent / "shared/data/cxr-pneumonia-256"))
    path = next(iter(sorted(root.glob("test/*/*.jpg"))), None)
    if path is None:
        raise SystemExit(f"no X-ray found under {root}/test/*/ (set CXR_TEST_DATA_DIR)")
    return path.name, path.read_bytes()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    name, data = sample_image()
    e2e, model, upload = [], [], []
    with run_stack(args.input_size) as stack, requests.Session() as http:
        for i in range(args.requests + 3):  # the first three warm up caches and connections
            t0 = time.perf_counter()
            r = http.post(f"{stack.web_url}/api/v1/predictions", files={"file": (name, data)})
            r.raise_for_status()
            t1 = time.perf_counter()
            url = stack.web_url + r.json()["status_url"]
            while (doc := http.get(url).json())["status"] not in ("done", "failed"):
                time.sleep(0.005)
            t2 = time.perf_counter()
            if doc["status"] != "done":
                raise SystemExit(f"prediction failed: {doc}")
            if i >= 3:
                e2e.append((t2 - t0) * 1000)
                upload.append((t1 - t0) * 1000)
                model.append(float(doc["result"]["timings_ms"]["model"]))
    overhead = [a - b for a, b in zip(e2e, model, strict=True)]
    report = {
        "input_size": args.input_size,
        "requests": args.requests,
        "image_bytes": len(data),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "e2e_ms": {"p50": statistics.median(e2e), "p95": percentile(e2e, 95), "max": max(e2e)},
        "upload_202_ms_p50": statistics.median(upload),
        "model_ms_p50": statistics.median(model),
        "overhead_ms_p50": statistics.median(overhead),
    }
    out = ROOT / "bench" / "results" / f"latency-{args.input_size}px.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'input':>6} {'e2e p50':>9} {'e2e p95':>9} {'model p50':>10} {'overhead p50':>13}")
    e2e_ms = report["e2e_ms"]
    print(
        f"{args.input_size:>5}px {e2e_ms['p50']:>7.1f}ms {e2e_ms['p95']:>7.1f}ms"
        f" {report['model_ms_p50']:>8.1f}ms {report['overhead_ms_p50']:>11.1f}ms"
    )
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
