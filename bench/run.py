"""Throughput, latency and memory of the whole cxr stack against the raw model, in one command.

    .venv/bin/python -m bench.run                 # full run (~11 min on 2 cores)
    .venv/bin/python -m bench.run --quick         # ~1 min smoke run (vgg32 + standin)
    .venv/bin/python -m bench.run --only standin --duration 10 --profile
    .venv/bin/python -m bench.run --markdown      # the tables of latest.json as Markdown

For each model config (VGG16 at 224 px, VGG16 at 32 px, the pooling+dense stand-in at 224 px):

1. raw in-process throughput of ``Classifier.predict_batch`` per batch size (in a subprocess, so
   no TensorFlow state leaks into this process or between configs);
2. the whole stack on 127.0.0.1 (redis-server, Celery inference worker(s), gunicorn) driven by
   closed-loop HTTP clients (POST an X-ray, then one ``GET status_url?wait=20``) at several
   concurrency levels, with dynamic batching on and off and everything else equal.

Prints a table and a summary of the targets, and writes bench/results/bench-<UTC date>.json and
bench/results/latest.json (a quick or --only run: bench-<date>-<suffix>.json and
latest-<suffix>.json, so it never replaces a full run's results). See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from bench.configs import (
    BATCH_DELAY_MS,
    DEFAULT_SHAPE,
    RESULTS,
    WAIT_SECONDS,
    Json,
    ModelConfig,
    Shape,
    model_configs,
    variants,
)
from bench.levels import run_stack_levels
from bench.loadgen import foreign_load, load_images, multipart
from bench.machine import machine
from bench.raw import raw_throughput, raw_throughput_child
from bench.report import load_generator_note, markdown, print_report, targets
from bench.stack import (
    ROOT,
    make_model,
)

# --- main -----------------------------------------------------------------------------------


def wait_for_idle(max_minutes: float) -> Json:
    """Wait (bounded) until no training job or pytest run of others is running."""
    started = time.monotonic()
    first = foreign_load()
    jobs = first
    while jobs and time.monotonic() - started < max_minutes * 60:
        print(f"waiting for other jobs to finish ({len(jobs)}): {jobs[0][:100]} ...", flush=True)
        time.sleep(15)
        jobs = foreign_load()
    return {
        "at_start": first,
        "waited_s": round(time.monotonic() - started, 1),
        "still_running_at_start": jobs,
        "ran_anyway": bool(jobs),
    }


def source_fingerprint() -> dict[str, str]:
    """A short hash of every service source file (others may edit them while a run goes on)."""
    return {
        str(path.relative_to(ROOT)): hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        for package in ("web", "worker", "ml")
        for path in sorted((ROOT / package).rglob("*.py"))
    }


@dataclass
class Plan:
    """What to run, from the command line."""

    quick: bool
    configs: list[ModelConfig]
    duration_s: float
    raw_sizes: tuple[int, ...]
    raw_min_s: float
    raw_min_calls: int
    profile_s: float
    keyspace_jobs: int


def sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    """Let SIGTERM unwind like Ctrl-C so every stack is stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def failed_run(batching: bool, shape: Shape, exc: Exception) -> Json:
    """A stack run that could not be measured (kept in the report, never silently dropped)."""
    print(f"    FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    return {
        "batching": batching,
        "shape": shape.label,
        "error": f"{type(exc).__name__}: {str(exc)[-3000:]}",
        "levels": [],
        "worker_memory_serving": [],
        "worker_memory_end": [],
    }


def upload_bodies(image_side: int | None) -> list[tuple[bytes, str]]:
    """The multipart bodies clients send: the shared X-rays, or real-size JPEGs made from them."""
    if image_side is None:
        images, _ = load_images()
    else:
        from tests.realsize import jpeg_xray

        height = round(image_side * 0.82)  # the aspect of a chest X-ray detector (~2500x2048)
        images = [(f"xray-{image_side}px.jpg", jpeg_xray(image_side, height))]
    return [multipart(name, data) for name, data in images]


def benchmark(plan: Plan, save: Callable[[dict[str, Json], bool], None]) -> None:
    """Run every config; ``save(configs, complete)`` after each one and at the end."""
    configs: dict[str, Json] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxr-bench-models-") as tmp:
        for cfg in plan.configs:
            print(f"[{time.perf_counter() - started:5.0f} s] {cfg.name}: {cfg.description}")
            model_dir = Path(tmp) / cfg.name
            make_model(cfg.kind, cfg.input_size, model_dir)
            bodies = upload_bodies(cfg.image_side)
            raw = raw_throughput(
                model_dir, plan.raw_sizes, plan.raw_min_s, plan.raw_min_calls, cfg.precision
            )
            print(f"  raw best {raw['best_images_per_s']} img/s at batch {raw['best_batch_size']}")
            best = float(raw["best_images_per_s"])
            runs: list[Json] = []
            configs[cfg.name] = {
                "description": cfg.description,
                "kind": cfg.kind,
                "input_size": cfg.input_size,
                "precision": raw["precision"],
                "upload": f"{cfg.image_side} px JPEG" if cfg.image_side else "shared 256 px",
                "upload_bytes": len(bodies[0][0]),
                "batch_max_size_on": cfg.batch_max,
                "batch_max_delay_ms": BATCH_DELAY_MS,
                "pool": f"threads, concurrency {cfg.batch_max} (batching on and off)",
                "raw": raw,
                "runs": runs,
            }
            jobs = (
                [(True, DEFAULT_SHAPE, cfg.levels), (False, DEFAULT_SHAPE, cfg.levels)]
                + [(True, shape, cfg.extra_levels) for shape in cfg.extra_shapes]
            )  # fmt: skip
            for batching, shape, levels in jobs:
                first = batching and shape == DEFAULT_SHAPE and cfg.kind == "standin"
                try:
                    runs.append(
                        run_stack_levels(
                            cfg, model_dir, bodies, batching, shape, levels, plan.duration_s,
                            best, profile_s=plan.profile_s if first else 0.0,
                            keyspace_jobs=plan.keyspace_jobs if first else 0,
                        )
                    )  # fmt: skip
                except Exception as exc:  # one broken stack must not lose the other results
                    runs.append(failed_run(batching, shape, exc))
            save(configs, False)
    save(configs, True)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse options and run the benchmark (or, internally, one raw throughput measurement)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="~1-2 min smoke run")
    parser.add_argument("--only", help="comma-separated configs: vgg224,vgg32,standin")
    parser.add_argument("--duration", type=float, help="measured seconds per load level")
    parser.add_argument(
        "--profile",
        type=float,
        nargs="?",
        const=10.0,
        default=0.0,
        metavar="S",
        help="py-spy the stand-in stack (batching on) for S s (default 10) after "
        "its levels; writes bench/results/profile-*.svg",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        metavar="MIN",
        help="first wait up to MIN minutes for training/pytest runs of others to "
        "end (default 30 for a full run, 0 with --quick)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        nargs="?",
        const=RESULTS / "latest.json",
        metavar="JSON",
        help="only print the tables of a results file (default latest.json) as Markdown",
    )
    parser.add_argument(
        "--keyspace-jobs",
        type=int,
        metavar="N",
        help="after the stand-in levels, one more with N finished jobs stored in Redis "
        "(default 25000 for a full run, 0 with --quick)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        help="comma-separated precisions to run every config in: auto, float32, bfloat16, "
        "float16 (default auto: what the hardware runs fastest)",
    )
    parser.add_argument(
        "--image-sizes",
        default="",
        help="also run every config with real-size JPEG uploads of these widths, e.g. 2500 "
        "(comma-separated; the shared 256 px X-rays always run)",
    )
    parser.add_argument("--raw-throughput", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32", help=argparse.SUPPRESS)
    parser.add_argument("--raw-min-seconds", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.add_argument("--raw-min-calls", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.raw_throughput:
        sizes = [int(s) for s in args.batch_sizes.split(",")]
        raw = raw_throughput_child(
            args.raw_throughput, sizes, args.raw_min_seconds, args.raw_min_calls, args.precision
        )
        print(json.dumps(raw))
        return

    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    configs = model_configs(args.quick)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = set(wanted) - {c.name for c in configs}
        if unknown:
            parser.error(f"unknown config(s) {sorted(unknown)}; choose from vgg224, vgg32, standin")
        configs = [c for c in configs if c.name in wanted]
    elif args.quick:
        configs = [c for c in configs if c.name != "vgg224"]  # one 224 px VGG16 level takes long
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    sides: list[int | None] = [None, *(int(s) for s in args.image_sizes.split(",") if s.strip())]
    bad = set(precisions) - {"auto", "float32", "bfloat16", "float16"}
    if bad:
        parser.error(f"unknown precision(s) {sorted(bad)}")
    configs = variants(configs, precisions, sides)
    plan = Plan(
        quick=args.quick,
        configs=configs,
        duration_s=args.duration or (3.0 if args.quick else 15.0),
        raw_sizes=(1, 8, 32) if args.quick else (1, 2, 4, 8, 16, 32),
        raw_min_s=0.5 if args.quick else 2.0,
        raw_min_calls=2 if args.quick else 3,
        profile_s=args.profile,
        keyspace_jobs=(
            args.keyspace_jobs if args.keyspace_jobs is not None else (0 if args.quick else 25_000)
        ),
    )
    signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    contention = wait_for_idle(
        args.wait_idle if args.wait_idle is not None else (0 if args.quick else 30)
    )
    started_at = datetime.now(UTC)
    info = machine()
    print(
        f"cxr bench ({'quick' if plan.quick else 'full'}): {[c.name for c in configs]}, "
        f"{plan.duration_s:g} s per level, {info['cpu_count']} CPUs",
        flush=True,
    )
    if contention["ran_anyway"]:
        jobs = contention["still_running_at_start"]
        print(f"WARNING: running while {len(jobs)} other job(s) run: {jobs[0][:80]} ...")
    command = " ".join([Path(sys.executable).name, "-m", "bench.run", *sys.argv[1:]])
    # A quick or partial (--only) run never replaces the results of a full one.
    suffix = "-quick" if plan.quick else ""
    if args.only:
        suffix += "-" + "+".join(sorted({c.name.split("-")[0] for c in configs}))
    if precisions != ["auto"] or len(sides) > 1:
        suffix += "-" + "+".join(precisions) + "".join(f"-{s}" for s in sides if s)
    out = RESULTS / f"bench-{started_at:%Y-%m-%d}{suffix}.json"
    latest = RESULTS / f"latest{suffix}.json"
    clock = time.perf_counter()
    final: Json = {}
    sources = source_fingerprint()

    def save(configs: dict[str, Json], complete: bool) -> None:
        levels = [lv for cfg in configs.values() for run in cfg["runs"] for lv in run["levels"]]
        contention["foreign_jobs_seen"] = sorted({j for lv in levels for j in lv["foreign_jobs"]})
        now = source_fingerprint()
        changed = sorted(k for k in sources.keys() | now.keys() if sources.get(k) != now.get(k))
        report: Json = {
            "mode": "quick" if plan.quick else "full",
            "complete": complete,
            "started_at": started_at.isoformat(timespec="seconds"),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "run_seconds": round(time.perf_counter() - clock, 1),
            "command": command,
            "machine": info,
            "contention": contention,
            # Stacks started after such a change ran the new code: compare like with like.
            "sources_changed_during_run": changed,
            "sources_at_start": sources,
            "duration_s_per_level": plan.duration_s,
            "status_wait_s": WAIT_SECONDS,
            "images": {"source": image_source, "count": image_count},
            "configs": configs,
            "targets": targets(configs),
            "load_generator_note": load_generator_note(configs),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        text = json.dumps(report, indent=2) + "\n"
        out.write_text(text)
        latest.write_text(text)
        final.clear()
        final.update(report)

    images, image_source = load_images()
    image_count = len(images)
    benchmark(plan, save)
    print_report(final)
    print(f"saved {out.relative_to(ROOT)} and {latest.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
