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
import html
import http.client
import importlib.metadata
import io
import json
import math
import os
import platform
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.typing import EncodableT, FieldT

from bench.stack import (
    ROOT,
    ModelKind,
    Stack,
    machine_busy_seconds,
    make_model,
    process_tree,
    run_stack,
)

RESULTS = ROOT / "bench" / "results"
WAIT_SECONDS = 20  # ?wait= of the status request (the API's maximum)
HTTP_TIMEOUT = 60.0
CLIENT_BOUND_CORES = 0.85  # one GIL-bound Python process cannot use much more than one core
TARGET_MODEL_BOUND_RATIO = 0.95
TARGET_BATCHING_GAIN = 2.0
TARGET_STANDIN_RATE = 500.0
TARGET_OVERHEAD_MS = 10.0
BATCH_DELAY_MS = 5.0  # CXR_BATCH_MAX_DELAY_MS with batching on (and off, where it is moot)

Json = dict[str, Any]


# --- configurations -------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """How many processes serve: everything about a stack but the model and batching."""

    label: str = "1 worker, 2 web"
    worker_processes: int = 1
    web_workers: int = 2


@dataclass(frozen=True)
class ModelConfig:
    """One model to benchmark and how to load it."""

    name: str
    kind: ModelKind
    input_size: int
    batch_max: int  # CXR_BATCH_MAX_SIZE with batching on; also the threads pool's concurrency
    levels: tuple[int, ...]  # client concurrency levels
    ramp_s: float  # measured window starts this long after the clients do
    warmup_s: float  # per stack, before the first level, at the highest concurrency
    extra_shapes: tuple[Shape, ...] = ()  # also run with batching on at the top levels
    extra_levels: tuple[int, ...] = ()

    @property
    def description(self) -> str:
        """Human name of the model."""
        model = "VGG16" if self.kind == "vgg16" else "stand-in (pooling+dense)"
        return f"{model} @ {self.input_size} px"


DEFAULT_SHAPE = Shape()


def model_configs(quick: bool) -> list[ModelConfig]:
    """The three configs; smaller levels and no extra shapes for a quick run."""
    if quick:
        return [
            ModelConfig("vgg224", "vgg16", 224, 32, (1, 8), ramp_s=1.0, warmup_s=2.0),
            ModelConfig("vgg32", "vgg16", 32, 32, (1, 16), ramp_s=0.5, warmup_s=1.0),
            ModelConfig("standin", "standin", 224, 32, (1, 16), ramp_s=0.5, warmup_s=1.0),
        ]
    return [
        ModelConfig("vgg224", "vgg16", 224, 32, (1, 4, 16, 32), ramp_s=3.0, warmup_s=6.0),
        ModelConfig("vgg32", "vgg16", 32, 32, (1, 4, 16, 32), ramp_s=1.0, warmup_s=3.0),
        ModelConfig(
            "standin", "standin", 224, 32, (1, 4, 16, 32, 64), ramp_s=1.0, warmup_s=3.0,
            extra_shapes=(Shape("2 workers, 2 web", 2, 2), Shape("1 worker, 4 web", 1, 4)),
            extra_levels=(32, 64),
        ),
    ]  # fmt: skip


# --- test images ----------------------------------------------------------------------------


def load_images(limit: int = 64) -> tuple[list[tuple[str, bytes]], str]:
    """Real X-rays from $CXR_TEST_DATA_DIR/test/*/*.jpg, else one generated PNG; and the source."""
    root = Path(os.environ.get("CXR_TEST_DATA_DIR", ROOT.parent / "shared/data/cxr-pneumonia-256"))
    paths = sorted(root.glob("test/*/*.jpg"))
    if paths:
        step = max(1, len(paths) // limit)  # spread over the classes
        return [(p.name, p.read_bytes()) for p in paths[::step][:limit]], str(root)
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(buf, format="PNG")
    return [("generated.png", buf.getvalue())], "generated 256x256 PNG (no X-rays found)"


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one ``file`` field, and its Content-Type."""
    boundary = uuid.uuid4().hex
    ctype = "image/png" if name.endswith(".png") else "image/jpeg"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: {ctype}\r\n\r\n"
    ).encode()
    return (
        head + data + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


# --- raw model throughput (subprocess) ------------------------------------------------------


def raw_throughput_child(
    model_dir: Path, batch_sizes: Sequence[int], min_seconds: float, min_calls: int
) -> Json:
    """Time ``Classifier.predict_batch`` per batch size; runs in its own process (imports TF)."""
    import numpy as np
    import tensorflow as tf

    from ml.imaging import decode_image, to_model_input
    from ml.versions import load_classifier

    clf = load_classifier(model_dir, 1)
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
        "by_batch_size": rows,
        "best_images_per_s": best["images_per_s"],
        "best_batch_size": best["batch_size"],
        "batch1_ms": rows[0]["ms_per_call"] if rows[0]["batch_size"] == 1 else None,
    }


def raw_throughput(
    model_dir: Path, batch_sizes: Sequence[int], min_s: float, min_calls: int
) -> Json:
    """Run :func:`raw_throughput_child` in a fresh interpreter and return its report."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--raw-throughput", str(model_dir),
         "--batch-sizes", ",".join(map(str, batch_sizes)), "--raw-min-seconds", str(min_s),
         "--raw-min-calls", str(min_calls)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"raw throughput failed:\n{proc.stderr[-3000:]}")
    report: Json = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


# --- load generator -------------------------------------------------------------------------


@dataclass
class Sample:
    """One prediction as the client saw it."""

    start: float
    end: float
    result: Json | None = None
    error: str | None = None
    job_id: str | None = None


@dataclass
class Budget:
    """A shared request count; each client takes one before each prediction."""

    left: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> bool:
        """Whether another prediction may start."""
        with self.lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True


class Client:
    """One closed-loop HTTP/1.1 client on its own keep-alive connection (one thread)."""

    def __init__(self, web_url: str, bodies: list[tuple[bytes, str]]):
        parts = urlsplit(web_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.bodies = bodies
        self.conn: http.client.HTTPConnection | None = None
        self.retries = 0

    def _request(
        self, method: str, path: str, body: bytes | None, ctype: str | None
    ) -> tuple[int, bytes]:
        for attempt in (0, 1):
            fresh = self.conn is None
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=HTTP_TIMEOUT)
            headers = {"Content-Type": ctype} if ctype else {}
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self.conn.close()
                    self.conn = None
                return resp.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                # A keep-alive connection the server closed meanwhile: retry once on a new one.
                if fresh or attempt:
                    raise
                self.retries += 1
        raise AssertionError("unreachable")

    def predict(self, i: int) -> Sample:
        """POST one X-ray and long-poll its result."""
        body, ctype = self.bodies[i % len(self.bodies)]
        start = time.perf_counter()
        try:
            status, data = self._request("POST", "/api/v1/predictions", body, ctype)
            if status != 202:
                return Sample(start, time.perf_counter(), error=f"POST {status}: {data[:200]!r}")
            url = json.loads(data)["status_url"]
            doc: Json = {}
            for _ in range(3):  # a job still running after 20 s is asked again, twice at most
                status, data = self._request("GET", f"{url}?wait={WAIT_SECONDS}", None, None)
                if status != 200:
                    return Sample(start, time.perf_counter(), error=f"GET {status}: {data[:200]!r}")
                doc = json.loads(data)
                if doc["status"] in ("done", "failed"):
                    break
            end = time.perf_counter()
            if doc.get("status") != "done":
                return Sample(start, end, error=f"job {doc.get('status')}: {doc.get('error')}")
            return Sample(start, end, result=doc["result"], job_id=doc.get("id"))
        except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            return Sample(start, time.perf_counter(), error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Close the connection."""
        if self.conn is not None:
            self.conn.close()


class Forgetter:
    """Deletes the Redis keys of jobs whose result a client already has (one thread).

    Results are otherwise kept for an hour, and every upload scans all Redis keys
    (``PredictionClient.workers``), so throughput would depend on how long the benchmark has
    been running; this keeps the keyspace as small as a service with short-lived results has.
    """

    def __init__(self, redis_url: str, prefix: str = "cxr"):
        self.client = redis.Redis.from_url(redis_url)
        self.prefix = prefix
        self.done: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.stop = threading.Event()
        self.deleted = 0
        self.thread = threading.Thread(target=self._run, name="forgetter", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        ids = []
        while True:
            try:
                ids.append(self.done.get_nowait())
            except queue.Empty:
                break
        if ids:
            keys = [f"{self.prefix}:{kind}:{i}" for i in ids for kind in ("job", "done")]
            self.deleted += int(self.client.delete(*keys))

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            self._drain()
        self._drain()

    def close(self) -> None:
        """Delete what is left and stop."""
        self.stop.set()
        self.thread.join(10)


def drive(
    web_url: str,
    bodies: list[tuple[bytes, str]],
    concurrency: int,
    seconds: float,
    max_requests: int,
    forget: Forgetter | None = None,
) -> tuple[list[Sample], int]:
    """``concurrency`` closed-loop clients for at most ``seconds`` and ``max_requests`` in all."""
    budget = Budget(max_requests)
    deadline = time.perf_counter() + seconds
    samples: list[Sample] = []
    clients = [Client(web_url, bodies) for _ in range(concurrency)]

    def loop(k: int, client: Client) -> None:
        i = k
        while time.perf_counter() < deadline and budget.take():
            sample = client.predict(i)
            samples.append(sample)  # list.append is atomic
            if forget is not None and sample.job_id is not None:
                forget.done.put(sample.job_id)
            i += concurrency
        client.close()

    threads = [
        threading.Thread(target=loop, args=(k, c), daemon=True, name=f"client-{k}")
        for k, c in enumerate(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:  # a request is bounded by the HTTP timeout, three status polls at most
        t.join(max(0.1, deadline - time.perf_counter()) + 4 * HTTP_TIMEOUT)
    return samples, sum(c.retries for c in clients)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def foreign_load() -> list[str]:
    """Command lines of CPU-heavy jobs of others that skew a benchmark (training, pytest)."""
    mine = set(process_tree([os.getpid()]))
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "python" in cmd and ("ml.training" in cmd or "pytest" in cmd):
            found.append(cmd.strip()[:160])
    return found


def clear_finished_jobs(stack: Stack, prefix: str = "cxr") -> int:
    """Delete the job hashes and done-tokens of finished predictions; return how many keys.

    The web process scans every Redis key on each upload (``PredictionClient.workers``), so
    throughput falls as results accumulate (they are kept for an hour): each level starts from
    the same, empty keyspace and :func:`add_finished_jobs` measures that effect on its own.
    """
    client = redis.Redis.from_url(stack.redis_url)
    deleted = 0
    for pattern in (f"{prefix}:job:*", f"{prefix}:done:*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 1000):
            deleted += int(client.delete(*keys[i : i + 1000]))
    return deleted


def add_finished_jobs(stack: Stack, jobs: int, prefix: str = "cxr") -> None:
    """Store ``jobs`` finished predictions the way the service does (a hash and a done-token)."""
    client = redis.Redis.from_url(stack.redis_url)
    now = time.time()
    result = json.dumps({"label": "NORMAL", "probabilities": {"NORMAL": 0.6, "PNEUMONIA": 0.4}})
    for start in range(0, jobs, 1000):
        pipe = client.pipeline(transaction=False)
        for _ in range(start, min(jobs, start + 1000)):
            job_id = uuid.uuid4().hex
            fields: dict[FieldT, EncodableT] = {
                "status": "done", "created_at": now, "finished_at": now, "result": result,
            }  # fmt: skip
            pipe.hset(f"{prefix}:job:{job_id}", mapping=fields)
            pipe.expire(f"{prefix}:job:{job_id}", 3600)
            pipe.rpush(f"{prefix}:done:{job_id}", 1)
            pipe.expire(f"{prefix}:done:{job_id}", 3600)
        pipe.execute()


def cpu_speed_ms() -> float:
    """Milliseconds one fixed pure-Python loop takes now (best of three; flags a slow machine)."""
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        sum(range(1_000_000))
        best = min(best, time.perf_counter() - t)
    return round(best * 1000, 2)


def run_level(
    stack: Stack,
    bodies: list[tuple[bytes, str]],
    concurrency: int,
    ramp_s: float,
    duration_s: float,
    best_raw: float,
    steady_keyspace: bool = True,
) -> Json:
    """Drive the stack at one concurrency level and summarise what clients and server saw.

    With ``steady_keyspace`` the level starts without finished jobs in Redis and the keys of
    each job are deleted once its client has the result (see :class:`Forgetter`).
    """
    foreign = foreign_load()
    speed = cpu_speed_ms()
    cleared = clear_finished_jobs(stack) if steady_keyspace else 0
    keys = int(redis.Redis.from_url(stack.redis_url).dbsize())
    cpu0, busy0, client0 = stack.cpu_by_component(), machine_busy_seconds(), time.process_time()
    t0 = time.perf_counter()
    max_requests = max(100, int((ramp_s + duration_s) * 2000))
    forget = Forgetter(stack.redis_url) if steady_keyspace else None
    try:
        samples, retries = drive(
            stack.web_url, bodies, concurrency, ramp_s + duration_s, max_requests, forget
        )
    finally:
        if forget is not None:
            forget.close()
    wall = time.perf_counter() - t0
    cpu1, busy1, client1 = stack.cpu_by_component(), machine_busy_seconds(), time.process_time()

    window_start = t0 + ramp_s
    measured = [s for s in samples if s.result is not None and window_start <= s.start]
    # Throughput between two completions (the last one by the end of the ramp and the last one
    # by the deadline): with large batches results arrive in bursts, and a window cut by the
    # clock alone would count one burst more or less.
    ends = sorted(s.end for s in samples if s.result is not None)
    first = max((e for e in ends if e <= window_start), default=window_start)
    last = max((e for e in ends if e <= t0 + ramp_s + duration_s), default=first)
    done_in_window = sum(1 for e in ends if first < e <= last)
    errors = [s.error for s in samples if s.error is not None]
    level: Json = {
        "concurrency": concurrency,
        "requests": len(samples),
        "completed": len(measured),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "connection_retries": retries,
        "window_s": round(last - first, 3),
        "throughput_per_s": round(done_in_window / (last - first), 2) if last > first else 0.0,
    }
    if measured:
        e2e = [(s.end - s.start) * 1000 for s in measured]
        results = [s.result for s in measured if s.result is not None]
        timings = [r["timings_ms"] for r in results]
        sizes = [int(r["batch_size"]) for r in results]
        model = [float(t["model"]) for t in timings]
        level |= {
            "latency_ms": {
                "p50": round(statistics.median(e2e), 2),
                "p95": round(percentile(e2e, 95), 2),
                "p99": round(percentile(e2e, 99), 2),
                "mean": round(statistics.fmean(e2e), 2),
                "max": round(max(e2e), 2),
            },
            # Per executed batch: predictions / batches (a batch of b counts b times in `sizes`).
            "batch_size_mean": round(len(sizes) / sum(1 / b for b in sizes), 2),
            "batch_size_max": max(sizes),
            "server_ms_mean": {
                k: round(statistics.fmean(float(t[k]) for t in timings if t.get(k) is not None), 2)
                for k in ("queue", "decode", "batch_wait", "model", "worker_total")
            },
            "model_ms_mean": round(statistics.fmean(model), 2),
            "overhead_ms_p50": round(
                statistics.median(a - b for a, b in zip(e2e, model, strict=True)), 2
            ),
            "outside_worker_ms_p50": round(
                statistics.median(
                    a - float(t["worker_total"]) for a, t in zip(e2e, timings, strict=True)
                ),
                2,
            ),
        }
    level["ratio_to_best_raw"] = (
        round(level["throughput_per_s"] / best_raw, 3) if best_raw else None
    )
    cores = {k: round((cpu1.get(k, 0) - cpu0.get(k, 0)) / wall, 2) for k in cpu1}
    client_cores = (client1 - client0) / wall
    busy = (busy1 - busy0) / wall
    cores |= {"client": round(client_cores, 2), "machine_busy": round(busy, 2)}
    cores["other"] = round(busy - sum(v for k, v in cores.items() if k != "machine_busy"), 2)
    level["cpu_cores"] = cores
    level["client_cpu_share"] = round(client_cores / busy, 3) if busy > 0 else None
    level["client_bound"] = client_cores >= CLIENT_BOUND_CORES
    level["foreign_jobs"] = foreign
    level["cpu_speed_ms"] = speed
    level["redis_keys_at_start"] = keys
    level["finished_job_keys_cleared"] = cleared
    level["steady_keyspace"] = steady_keyspace
    level["redis_keys_at_end"] = int(redis.Redis.from_url(stack.redis_url).dbsize())
    return level


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
        web_threads=top + 8,  # every client may land on one web worker; ?wait holds a thread
    ) as stack:
        startup_s = time.perf_counter() - started
        drive(stack.web_url, bodies, top, cfg.warmup_s, int(cfg.warmup_s * 2000))
        run: Json = {
            "batching": batching,
            "shape": shape.label,
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


# --- report ---------------------------------------------------------------------------------

HEADER = (
    f"{'config':<8} {'batch':<5} {'shape':<16} {'conc':>4} {'pred/s':>8} {'p50 ms':>8} "
    f"{'p95 ms':>8} {'p99 ms':>8} {'batch':>9} {'model ms':>8} {'÷raw':>6} {'err':>4} "
    f"{'client':>6} {'web':>5} {'wrk':>5} {'redis':>5} {'busy':>5}"
)


def row(name: str, batching: bool, shape: str, lv: Json) -> str:
    """One table row."""
    lat = lv.get("latency_ms", {})
    batch = f"{lv.get('batch_size_mean', 0):.1f}/{lv.get('batch_size_max', 0)}"
    ratio = lv["ratio_to_best_raw"] if lv["ratio_to_best_raw"] is not None else math.nan
    flag = "!" if lv["client_bound"] else " "
    cores = lv["cpu_cores"]
    return (
        f"{name:<8} {'on' if batching else 'off':<5} {shape:<16} {lv['concurrency']:>4} "
        f"{lv['throughput_per_s']:>8.1f} {lat.get('p50', math.nan):>8.1f} "
        f"{lat.get('p95', math.nan):>8.1f} {lat.get('p99', math.nan):>8.1f} {batch:>9} "
        f"{lv.get('model_ms_mean', math.nan):>8.2f} {ratio:>6.2f} "
        f"{lv['errors']:>4} {cores['client']:>5.2f}{flag} {cores['web']:>5.2f} "
        f"{cores['worker']:>5.2f} {cores['redis']:>5.2f} {cores['machine_busy']:>5.2f}"
    )


def verdict(ok: bool | None) -> str:
    """MET / NOT MET / N/A."""
    return "N/A" if ok is None else ("MET" if ok else "NOT MET")


def default_runs(cfg: Json) -> dict[bool, Json]:
    """The batching on/off runs of a config with the default shape."""
    return {r["batching"]: r for r in cfg["runs"] if r["shape"] == DEFAULT_SHAPE.label}


def targets(configs: dict[str, Json]) -> Json:
    """The issue's four targets, each with the measured value and whether it is met."""
    out: Json = {}
    if "vgg224" in configs:
        cfg = configs["vgg224"]
        on = default_runs(cfg).get(True)
        best = max(on["levels"], key=lambda lv: lv["throughput_per_s"]) if on else None
        raw = cfg["raw"]
        ratio = best["throughput_per_s"] / raw["best_images_per_s"] if best else None
        out["model_bound_e2e_vs_raw"] = {
            "target": f">= {TARGET_MODEL_BOUND_RATIO} x best raw (VGG16 224 px, batching on)",
            "value": round(ratio, 3) if ratio is not None else None,
            "detail": (
                f"{best['throughput_per_s']} pred/s at concurrency {best['concurrency']} vs "
                f"{raw['best_images_per_s']} img/s raw (batch {raw['best_batch_size']})"
                if best
                else None
            ),
            "verdict": verdict(None if ratio is None else ratio >= TARGET_MODEL_BOUND_RATIO),
        }
    if "vgg32" in configs:
        runs = default_runs(configs["vgg32"])
        gain = detail = None
        if runs.get(True, {}).get("levels") and runs.get(False, {}).get("levels"):
            top = max(lv["concurrency"] for lv in runs[True]["levels"])
            on = next(lv for lv in runs[True]["levels"] if lv["concurrency"] == top)
            off = next((lv for lv in runs[False]["levels"] if lv["concurrency"] == top), None)
            if off is not None:
                gain = on["throughput_per_s"] / max(1e-9, off["throughput_per_s"])
                detail = (
                    f"{on['throughput_per_s']} vs {off['throughput_per_s']} pred/s at "
                    f"concurrency {top}"
                )
        out["vgg32_batching_gain"] = {
            "target": f"batching on >= {TARGET_BATCHING_GAIN} x off (VGG16 32 px, top concurrency)",
            "value": round(gain, 2) if gain is not None else None,
            "detail": detail,
            "verdict": verdict(None if gain is None else gain >= TARGET_BATCHING_GAIN),
        }
    if "standin" in configs:
        best_run, best = None, None
        for run in configs["standin"]["runs"]:
            for lv in run["levels"]:
                if best is None or lv["throughput_per_s"] > best["throughput_per_s"]:
                    best_run, best = run, lv
        out["standin_rate"] = {
            "target": f">= {TARGET_STANDIN_RATE:g} predictions/s (stand-in model)",
            "value": best["throughput_per_s"] if best else None,
            "detail": (
                f"batching {'on' if best_run['batching'] else 'off'}, {best_run['shape']}, "
                f"concurrency {best['concurrency']}, client {best['cpu_cores']['client']} cores "
                f"of {best['cpu_cores']['machine_busy']} busy"
                if best and best_run
                else None
            ),
            "verdict": verdict(
                None if best is None else best["throughput_per_s"] >= TARGET_STANDIN_RATE
            ),
        }
    overheads = {}
    for name, cfg in configs.items():
        for batching, run in default_runs(cfg).items():
            lv = next((lv for lv in run["levels"] if lv["concurrency"] == 1), None)
            if lv and "overhead_ms_p50" in lv:
                overheads[f"{name} batching {'on' if batching else 'off'}"] = lv["overhead_ms_p50"]
    # The served default: VGG16 224 px with batching on; every config is listed beside it.
    heads = ("vgg224 batching on", "vgg32 batching on", "standin batching on")
    head = next((k for k in heads if k in overheads), None)
    value = overheads.get(head) if head else None
    out["overhead_p50"] = {
        "target": f"<= {TARGET_OVERHEAD_MS:g} ms p50 of (e2e - model ms) at concurrency 1",
        "value": value,
        "detail": f"{head}; all: {overheads}" if head else str(overheads),
        "verdict": verdict(None if value is None else value <= TARGET_OVERHEAD_MS),
        "all": overheads,
        "all_met": all(v <= TARGET_OVERHEAD_MS for v in overheads.values()) if overheads else None,
    }
    return out


def print_report(report: Json) -> None:
    """The table, memory, raw throughput and the summary block."""
    print("\n" + HEADER)
    print("-" * len(HEADER))
    for name, cfg in report["configs"].items():
        for run in cfg["runs"]:
            for lv in run["levels"]:
                print(row(name, run["batching"], run["shape"], lv))
            if run.get("error"):
                on = "on" if run["batching"] else "off"
                print(f"{name:<8} {on:<5} {run['shape']:<16} FAILED: {run['error'][:120]}")
    print(
        "(batch = mean/max executed batch size; ÷raw = pred/s ÷ best raw img/s; client, web, wrk,"
        " redis, busy = CPU cores used by the load generator, gunicorn, inference workers,\n"
        " redis-server and the whole machine; ! = load generator bound)"
    )
    print("\nunloaded latency (concurrency 1, p50 ms; overhead = e2e - model):")
    for name, cfg in report["configs"].items():
        for batching, run in default_runs(cfg).items():
            lv = next((lv for lv in run["levels"] if lv["concurrency"] == 1), None)
            if lv is None or "latency_ms" not in lv:
                continue
            t = lv["server_ms_mean"]
            on = "on " if batching else "off"
            print(
                f"  {name:<8} batching {on}: e2e {lv['latency_ms']['p50']:.1f}"
                f"  overhead {lv['overhead_ms_p50']:.1f}  (means: queue {t['queue']:.1f},"
                f" decode {t['decode']:.1f}, batch_wait {t['batch_wait']:.1f}, model"
                f" {t['model']:.1f}; outside the worker p50 {lv['outside_worker_ms_p50']:.1f})"
            )
    print("\nraw model throughput (Classifier.predict_batch, images/s by batch size):")
    for name, cfg in report["configs"].items():
        raw = cfg["raw"]
        sizes = "  ".join(
            f"{r['batch_size']}:{r['images_per_s']:.1f}" for r in raw["by_batch_size"]
        )
        print(
            f"  {name:<8} {sizes}   best {raw['best_images_per_s']:.1f} @ {raw['best_batch_size']}"
        )
    print("\ninference worker memory (RSS MiB when serving -> after load, peak):")
    for name, cfg in report["configs"].items():
        for run in cfg["runs"]:
            end = {m["pid"]: m for m in run["worker_memory_end"]}
            mems = ", ".join(
                f"{m.get('VmRSS', 0):.0f} -> {end.get(m['pid'], {}).get('VmRSS', 0):.0f}"
                f" (peak {end.get(m['pid'], {}).get('VmHWM', 0):.0f})"
                for m in run["worker_memory_serving"]
            )
            on = "on " if run["batching"] else "off"
            print(f"  {name:<8} batching {on} [{run['shape']}]: {mems}")
    for name, cfg in report["configs"].items():
        for run in cfg["runs"]:
            probe = run.get("keyspace_probe")
            if probe:
                print(
                    f"\nRedis keyspace ({name}, batching on, concurrency {probe['concurrency']}): "
                    f"{probe['baseline_throughput_per_s']} pred/s from an empty keyspace, "
                    f"{probe['throughput_per_s']} pred/s with {probe['finished_jobs_added']} "
                    "finished jobs stored (uploads scan every key: PredictionClient.workers)"
                )
            prof = run.get("profile")
            if prof and prof.get("top_inclusive"):
                print(f"\nprofile ({name}, concurrency {prof['concurrency']}, py-spy --gil), "
                      "share of GIL-holding samples in project code:")  # fmt: skip
                for label, frames in prof["top_inclusive"].items():
                    own = [f.strip() for f in frames if re.search(r"\((web|worker|ml)/", f)]
                    print(f"  {label}: " + "; ".join(own[:6]))
    print("\nsummary (targets):")
    for key, t in report["targets"].items():
        print(f"  {key:<24} {t['verdict']:<8} value {t['value']}  ({t['target']}; {t['detail']})")
    if report.get("load_generator_note"):
        print(f"  note: {report['load_generator_note']}")
    if report.get("sources_changed_during_run"):
        changed = report["sources_changed_during_run"]
        print(f"  WARNING: service code changed during the run: {', '.join(changed)}")
    if report["contention"]["foreign_jobs_seen"]:
        jobs = report["contention"]["foreign_jobs_seen"]
        print(
            f"  WARNING: {len(jobs)} CPU-heavy job(s) of others ran meanwhile: {jobs[0][:80]} ..."
        )
    print(f"\nrun time {report['run_seconds']:.0f} s")


def markdown(report: Json) -> str:
    """The tables of a report as Markdown (for bench/README.md)."""
    contended = False
    changed = ", ".join(report.get("sources_changed_during_run", []))
    lines = [
        f"{report['mode']} run {report['started_at']}, {report['run_seconds']:.0f} s, "
        f"{report['machine']['cpu_count']} CPUs, TensorFlow {report['machine']['tensorflow']}"
        + (f"; service code changed during the run: {changed}" if changed else ""),
        "",
        "| config | batching | shape | conc | pred/s | p50 ms | p95 ms | p99 ms | batch mean/max "
        "| model ms | ÷ best raw | errors | CPU cores client/web/worker/redis/busy |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for name, cfg in report["configs"].items():
        for run in cfg["runs"]:
            on = "on" if run["batching"] else "off"
            if run.get("error"):
                lines.append(f"| {name} | {on} | {run['shape']} | FAILED: {run['error'][:80]} |")
            for lv in run["levels"]:
                lat, c = lv.get("latency_ms", {}), lv["cpu_cores"]
                mark = " †" if lv["foreign_jobs"] else ""
                contended = contended or bool(mark)
                ratio = lv["ratio_to_best_raw"]
                lines.append(
                    f"| {name} | {on} | {run['shape']} | {lv['concurrency']}{mark} "
                    f"| {lv['throughput_per_s']:.1f} | {lat.get('p50', math.nan):.1f} "
                    f"| {lat.get('p95', math.nan):.1f} | {lat.get('p99', math.nan):.1f} "
                    f"| {lv.get('batch_size_mean', 0):.1f}/{lv.get('batch_size_max', 0)} "
                    f"| {lv.get('model_ms_mean', math.nan):.2f} "
                    f"| {ratio if ratio is not None else ''} | {lv['errors']} "
                    f"| {c['client']}/{c['web']}/{c['worker']}/{c['redis']}/{c['machine_busy']} |"
                )
    if contended:
        lines += ["", "† another CPU-heavy job (training or pytest) ran during this level."]
    lines += [
        "",
        "| concurrency 1 | e2e p50 ms | overhead p50 ms | queue | decode | batch_wait | model |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, cfg in report["configs"].items():
        for batching, run in default_runs(cfg).items():
            lv = next((lv for lv in run["levels"] if lv["concurrency"] == 1), None)
            if lv is None or "latency_ms" not in lv:
                continue
            t = lv["server_ms_mean"]
            lines.append(
                f"| {name} batching {'on' if batching else 'off'} | {lv['latency_ms']['p50']:.1f} "
                f"| {lv['overhead_ms_p50']:.1f} | {t['queue']:.1f} | {t['decode']:.1f} "
                f"| {t['batch_wait']:.1f} | {t['model']:.1f} |"
            )
    lines += ["", "| model | raw images/s by batch size | best |", "|---|---|--:|"]
    for name, cfg in report["configs"].items():
        raw = cfg["raw"]
        sizes = ", ".join(
            f"{r['batch_size']}: {r['images_per_s']:.1f}" for r in raw["by_batch_size"]
        )
        lines.append(f"| {name} | {sizes} | {raw['best_images_per_s']:.1f} |")
    lines += [
        "",
        "| inference worker process | RSS MiB serving | RSS after load | peak |",
        "|---|--:|--:|--:|",
    ]
    for name, cfg in report["configs"].items():
        for run in cfg["runs"]:
            end = {m["pid"]: m for m in run["worker_memory_end"]}
            for m in run["worker_memory_serving"]:
                after = end.get(m["pid"], {})
                lines.append(
                    f"| {name} batching {'on' if run['batching'] else 'off'} [{run['shape']}] "
                    f"| {m.get('VmRSS', 0):.0f} | {after.get('VmRSS', 0):.0f} "
                    f"| {after.get('VmHWM', 0):.0f} |"
                )
    for name, cfg in report["configs"].items():
        for run in cfg["runs"]:
            probe = run.get("keyspace_probe")
            if probe:
                lines += [
                    "",
                    f"Redis keyspace ({name}, batching on, concurrency {probe['concurrency']}): "
                    f"{probe['baseline_throughput_per_s']} pred/s with finished jobs deleted, "
                    f"{probe['throughput_per_s']} pred/s with {probe['finished_jobs_added']} "
                    "finished jobs kept in Redis.",
                ]
    lines += ["", "| target | verdict | measured |", "|---|---|---|"]
    for t in report["targets"].values():
        detail = t["detail"] if "all" not in t else f"{t['detail'].split(';')[0]}; {t['all']}"
        lines.append(f"| {t['target']} | **{t['verdict']}** | {t['value']} — {detail} |")
    return "\n".join(lines)


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


def machine() -> Json:
    """What the numbers were measured on."""
    tf_version = None
    for dist in ("tensorflow-cpu", "tensorflow"):
        try:
            tf_version = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf_version,
        "loadavg_at_start": list(os.getloadavg()),
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


def benchmark(plan: Plan, save: Callable[[dict[str, Json], bool], None]) -> None:
    """Run every config; ``save(configs, complete)`` after each one and at the end."""
    images, _ = load_images()
    bodies = [multipart(name, data) for name, data in images]
    configs: dict[str, Json] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxr-bench-models-") as tmp:
        for cfg in plan.configs:
            print(f"[{time.perf_counter() - started:5.0f} s] {cfg.name}: {cfg.description}")
            model_dir = Path(tmp) / cfg.name
            make_model(cfg.kind, cfg.input_size, model_dir)
            raw = raw_throughput(model_dir, plan.raw_sizes, plan.raw_min_s, plan.raw_min_calls)
            print(f"  raw best {raw['best_images_per_s']} img/s at batch {raw['best_batch_size']}")
            best = float(raw["best_images_per_s"])
            runs: list[Json] = []
            configs[cfg.name] = {
                "description": cfg.description,
                "kind": cfg.kind,
                "input_size": cfg.input_size,
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


def load_generator_note(configs: dict[str, Json]) -> str | None:
    """Say whether the Python load generator limited any level."""
    bound = [
        f"{name} {'on' if run['batching'] else 'off'} [{run['shape']}] c={lv['concurrency']}"
        f" ({lv['cpu_cores']['client']} cores)"
        for name, cfg in configs.items()
        for run in cfg["runs"]
        for lv in run["levels"]
        if lv["client_bound"]
    ]
    if bound:
        return "the Python load generator was near one full core (GIL-bound) at: " + "; ".join(
            bound
        )
    shares = [
        (lv["client_cpu_share"] or 0, name, lv["concurrency"])
        for name, cfg in configs.items()
        for run in cfg["runs"]
        for lv in run["levels"]
    ]
    top = max(shares, default=None)
    if top and top[0] >= 0.2:
        return (
            f"the load generator never saturated its core, but used up to {top[0]:.0%} of all CPU "
            f"used ({top[1]} c={top[2]}): on {os.cpu_count()} cores it competes with the stack"
        )
    return None


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
    parser.add_argument("--raw-throughput", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32", help=argparse.SUPPRESS)
    parser.add_argument("--raw-min-seconds", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.add_argument("--raw-min-calls", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.raw_throughput:
        sizes = [int(s) for s in args.batch_sizes.split(",")]
        raw = raw_throughput_child(
            args.raw_throughput, sizes, args.raw_min_seconds, args.raw_min_calls
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
        suffix += "-" + "+".join(c.name for c in configs)
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
