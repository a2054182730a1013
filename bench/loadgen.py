"""The load generator: test images, closed-loop HTTP clients, one load level against a stack."""

from __future__ import annotations

import http.client
import io
import json
import math
import os
import queue
import statistics
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import redis
from redis.typing import EncodableT, FieldT

from bench.configs import CLIENT_BOUND_CORES, HTTP_TIMEOUT, WAIT_SECONDS, Json
from bench.stack import (
    ROOT,
    Stack,
    machine_busy_seconds,
    process_tree,
)

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


# The keys a finished prediction leaves: its hash, done-token, kept image and Grad-CAM map.
FINISHED_KINDS = ("job", "done", "upload", "heatmap")


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
            keys = [f"{self.prefix}:{kind}:{i}" for i in ids for kind in FINISHED_KINDS]
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
    """Delete the keys of finished predictions (hash, done-token, image, map); return how many.

    The web process scans every Redis key on each upload (``PredictionClient.workers``), so
    throughput falls as results accumulate (they are kept for an hour): each level starts from
    the same, empty keyspace and :func:`add_finished_jobs` measures that effect on its own.
    """
    client = redis.Redis.from_url(stack.redis_url)
    deleted = 0
    for pattern in (f"{prefix}:{kind}:*" for kind in FINISHED_KINDS):
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
