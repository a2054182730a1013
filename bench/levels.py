"""Driving one stack through its load levels, with optional py-spy profiles of a level."""

from __future__ import annotations

import html
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.configs import BATCH_DELAY_MS, RESULTS, Json, ModelConfig, Shape
from bench.loadgen import Forgetter, add_finished_jobs, clear_finished_jobs, drive, run_level
from bench.report import row
from bench.stack import (
    ROOT,
    Stack,
    process_tree,
    run_stack,
)

# --- profiling ------------------------------------------------------------------------------


def profile_level(
    stack: Stack, bodies: list[tuple[bytes, str]], concurrency: int, seconds: float, name: str
) -> Json:
    """Drive a level while py-spy records the inference worker and each gunicorn worker."""
    pyspy = Path(sys.executable).with_name("py-spy")
    if not pyspy.exists():
        return {"skipped": f"{pyspy} not installed (.venv/bin/pip install py-spy)"}
    targets = [(f"{name}-worker{i}", pid) for i, pid in enumerate(stack.worker_pids)]
    web = [p for p in process_tree([stack.web_pid]) if p != stack.web_pid]
    targets += [(f"{name}-web{i}", pid) for i, pid in enumerate(web)]
    procs = []
    for label, pid in targets:
        out = RESULTS / f"profile-{label}.svg"
        cmd = [str(pyspy), "record", "--pid", str(pid), "--duration", str(int(seconds)),
               "--gil", "--output", str(out)]  # fmt: skip
        procs.append(
            (label, out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        )
    clear_finished_jobs(stack)
    forget = Forgetter(stack.redis_url)
    time.sleep(0.5)  # py-spy attaches
    try:
        samples, _ = drive(stack.web_url, bodies, concurrency, seconds, int(seconds * 2000), forget)
    finally:
        forget.close()
    files = {}
    for label, out, proc in procs:
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        files[label] = str(out.relative_to(ROOT)) if out.exists() else f"failed: {err[-300:]!r}"
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "predictions": len(samples),
        "py_spy": "record --gil (samples only threads holding the GIL: Python work, not waiting)",
        "files": files,
        "top_inclusive": {
            label: flamegraph_top(ROOT / path)
            for label, path in files.items()
            if path.endswith(".svg")
        },
    }


_FRAME = re.compile(
    r'<title>([^<]*)</title><rect x="[^"]*" y="(\d+)"[^>]*fg:x="(\d+)" fg:w="(\d+)"'
)


def flamegraph_top(path: Path, top: int = 30) -> list[str]:
    """The functions with the most samples (inclusive, once per stack) of a py-spy SVG."""
    frames: dict[int, list[tuple[int, int, str]]] = {}
    for m in _FRAME.finditer(path.read_text(errors="replace")):
        name = re.sub(r" \([\d,]+ samples?, [\d.]+%\)$", "", html.unescape(m.group(1)))
        name = re.sub(r":\d+\)$", ")", name)  # one entry per function, not per line
        frames.setdefault(int(m.group(2)), []).append((int(m.group(3)), int(m.group(4)), name))
    if not frames:
        return []
    cover = {y: sum(w for _, w, _ in fs) for y, fs in frames.items()}
    root = max(cover, key=lambda y: (cover[y], y))  # py-spy draws the roots at the bottom
    step = -16 if root == max(frames) else 16
    total, seen = cover[root], Counter[str]()

    def walk(y: int, lo: int, hi: int, above: frozenset[str]) -> None:
        for x, w, name in frames.get(y, []):
            if lo <= x < hi:
                if name not in above:
                    seen[name] += w
                walk(y + step, x, x + w, above | {name})

    walk(root, 0, sum(w for _, w, _ in frames[root]) + 1, frozenset())
    return [f"{n / total:6.1%} {name}" for name, n in seen.most_common(top)]


# --- one stack run --------------------------------------------------------------------------


def run_stack_levels(
    cfg: ModelConfig,
    model_dir: Path,
    bodies: list[tuple[bytes, str]],
    batching: bool,
    shape: Shape,
    levels: Sequence[int],
    duration_s: float,
    best_raw: float,
    profile_s: float = 0.0,
    keyspace_jobs: int = 0,
) -> Json:
    """Start a stack, warm it up, drive each level, stop it.

    With ``keyspace_jobs``, one more level (concurrency 16 or the top) runs after storing that
    many finished jobs, as an hour of traffic leaves them in Redis.
    """
    top = max(levels)
    print(f"  {cfg.name} batching {'on ' if batching else 'off'} [{shape.label}] ...", flush=True)
    started = time.perf_counter()
    with run_stack(
        cfg.input_size,
        worker_concurrency=cfg.batch_max,
        web_workers=shape.web_workers,
        model_kind=cfg.kind,
        model_dir=model_dir,
        worker_processes=shape.worker_processes,
        pool="threads",
        batch_max_size=cfg.batch_max if batching else 1,
        batch_max_delay_ms=BATCH_DELAY_MS,
        precision=cfg.precision,
        explain=shape.explain,
        web_threads=top + 8,  # every client may land on one web worker; ?wait holds a thread
    ) as stack:
        startup_s = time.perf_counter() - started
        drive(stack.web_url, bodies, top, cfg.warmup_s, int(cfg.warmup_s * 2000))
        run: Json = {
            "batching": batching,
            "shape": shape.label,
            "explain": shape.explain,
            "settings": stack.settings,
            "startup_s": round(startup_s, 1),
            "worker_memory_serving": stack.worker_memory,
            "levels": [],
        }
        for c in levels:
            level = run_level(stack, bodies, c, cfg.ramp_s, duration_s, best_raw)
            run["levels"].append(level)
            print("    " + row(cfg.name, batching, shape.label, level), flush=True)
        run["worker_memory_end"] = stack.read_worker_memory()
        if profile_s > 0:
            run["profile"] = profile_level(stack, bodies, top, profile_s, cfg.name)
        if keyspace_jobs > 0:
            c = min(16, top)
            clear_finished_jobs(stack)
            add_finished_jobs(stack, keyspace_jobs)
            level = run_level(
                stack, bodies, c, cfg.ramp_s, duration_s, best_raw, steady_keyspace=False
            )
            base = next((lv for lv in run["levels"] if lv["concurrency"] == c), None)
            run["keyspace_probe"] = {
                "finished_jobs_added": keyspace_jobs,
                "concurrency": c,
                "throughput_per_s": level["throughput_per_s"],
                "baseline_throughput_per_s": base["throughput_per_s"] if base else None,
                "level": level,
            }
            print(
                f"    with {keyspace_jobs} finished jobs in Redis, concurrency {c}: "
                f"{level['throughput_per_s']} pred/s (empty keyspace: "
                f"{base['throughput_per_s'] if base else '?'})",
                flush=True,
            )
    return run
