"""The web process's own cost per upload and per status poll, in one process, in seconds.

    .venv/bin/python -m bench.submit                 # 2000 submits + polls, ~10 s
    .venv/bin/python -m bench.submit -n 500 --profile cumulative   # + the top functions

The web app (``web.create_app``) with a real Redis (``--redis-url``, a database of its own by
default, every key under a throwaway prefix and removed at the end) and a fake heartbeat of a
worker that serves, driven through Flask's test client: no worker runs, so each submit's Celery
message just waits in the queue (the queue is emptied between phases, untimed). The uploads are
real X-rays from ``$CXR_TEST_DATA_DIR/test/*/*.jpg`` in multipart bodies with a fresh random
boundary each, as browsers and ``bench.loadgen`` send them. Rate limits are off (as in
``bench.run``) unless ``--rate-limit`` sets one; the queue bound stays on (its LLEN is part of a
submit), set above ``-n``.

Phases, each timed per request (wall and process CPU) with the Redis round trips (socket writes
of redis-py connections: a pipeline is one) and the commands they carried counted client-side:

- ``submit``: ``POST /api/v1/predictions``;
- ``poll``: ``GET /api/v1/predictions/<id>`` of a queued job;
- ``poll_wait``: ``GET ...?wait=20`` of a job that finishes during the wait (its done token is
  pushed beforehand, untimed, so the wait returns at once and the numbers are the path's own);
- ``poll_done``: ``GET ...?wait=20`` of a finished job (a result with an explanation, as a
  worker writes it): what the closed-loop clients of ``bench.run`` mostly get.

Writes bench/results/submit-<UTC date>[-label].json. The whole stack is ``python -m bench.run``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from redis.connection import AbstractConnection

from bench.configs import RESULTS, Json
from bench.loadgen import load_images, multipart
from bench.machine import machine


class RoundTrips:
    """Counts redis-py round trips (one per ``send_packed_command``) and the commands in them."""

    def __init__(self) -> None:
        self.trips = 0
        self.commands: Counter[str] = Counter()
        self.connects = 0

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Count in every redis-py connection of this process (web client, kombu, limiter)."""
        send = AbstractConnection.send_packed_command
        on_connect = AbstractConnection.on_connect
        counter = self

        def counted_send(conn: AbstractConnection, command: Any, check_health: bool = True) -> None:
            counter.trips += 1
            chunks = [command] if isinstance(command, bytes | str) else command
            counter.commands.update(command_names(b"".join(_bytes(c) for c in chunks)))
            send(conn, command, check_health)

        def counted_connect(conn: AbstractConnection) -> None:
            counter.connects += 1
            on_connect(conn)

        AbstractConnection.send_packed_command = counted_send  # type: ignore[method-assign]
        AbstractConnection.on_connect = counted_connect  # type: ignore[method-assign]
        try:
            yield
        finally:
            AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
            AbstractConnection.on_connect = on_connect  # type: ignore[method-assign]


def _bytes(chunk: bytes | str | memoryview) -> bytes:
    return chunk.encode() if isinstance(chunk, str) else bytes(chunk)


def command_names(packed: bytes) -> list[str]:
    """The command names in RESP-packed commands (``*n`` arrays of ``$len`` bulk strings)."""
    names, pos = [], 0
    while pos < len(packed) and packed[pos : pos + 1] == b"*":
        end = packed.index(b"\r\n", pos)
        count, pos = int(packed[pos + 1 : end]), end + 2
        for i in range(count):
            end = packed.index(b"\r\n", pos)
            size = int(packed[pos + 1 : end])
            if i == 0:
                names.append(packed[end + 2 : end + 2 + size].decode().upper())
            pos = end + 2 + size + 2
    return names


def timed(
    n: int, request: Callable[[int], Any], counter: RoundTrips, profile: cProfile.Profile | None
) -> Json:
    """Run ``request(i)`` for i < n; per-request wall and CPU ms, round trips and commands."""
    wall, cpu = [], []
    trips0, commands0, connects0 = counter.trips, Counter(counter.commands), counter.connects
    for i in range(n):
        if profile is not None:
            profile.enable()
        t0, c0 = time.perf_counter(), time.process_time()
        request(i)
        c1, t1 = time.process_time(), time.perf_counter()
        if profile is not None:
            profile.disable()
        wall.append((t1 - t0) * 1000)
        cpu.append((c1 - c0) * 1000)
    commands = counter.commands - commands0
    return {
        "n": n,
        "wall_ms_mean": round(statistics.fmean(wall), 3),
        "wall_ms_p50": round(statistics.median(wall), 3),
        "cpu_ms_mean": round(statistics.fmean(cpu), 3),
        "round_trips_per_request": round((counter.trips - trips0) / n, 3),
        "commands_per_request": {k: round(v / n, 3) for k, v in sorted(commands.items())},
        "new_connections": counter.connects - connects0,
        "requests_per_s_one_core": round(1000 / statistics.fmean(wall), 1),
    }


def fake_serving_worker(client: redis.Redis, prefix: str) -> None:
    """Write the heartbeat of one worker process that serves version 1 (as a worker does)."""
    from worker.client import Keys, WorkerInfo

    keys = Keys(prefix)
    info = WorkerInfo("bench:1", "serving", 1, ["NORMAL", "PNEUMONIA"], 224, None, time.time())
    client.set(keys.worker(info.name), info.to_json(), ex=600)
    client.zadd(keys.workers(), {keys.worker(info.name): time.time() + 600})


def finish(client: redis.Redis, keys: Any, ids: Sequence[str]) -> None:
    """Mark every job done with a result as a worker stores it (with an explanation)."""
    from worker.records import Explanation, PredictionResult, Timings

    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        result = PredictionResult(
            label="PNEUMONIA",
            probabilities={"NORMAL": 0.12, "PNEUMONIA": 0.88},
            model_version=1,
            decision_threshold=0.5,
            batch_size=16,
            timings_ms=Timings(queue=3.1, decode=1.2, batch_wait=2.0, model=4.5, worker_total=9.0),
            explanation=Explanation.for_job(job_id, "grad-cam", "block5_conv3", "PNEUMONIA"),
        )
        pipe.hset(
            keys.job(job_id),
            mapping={"status": "done", "finished_at": time.time(), "result": result.to_json()},
        )
    pipe.execute()


def remove_keys(client: redis.Redis, prefix: str, queues: Sequence[str]) -> int:
    """Delete every key this run wrote: its prefix, its queues and kombu's bindings of them."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    keys += [*queues, *(f"_kombu.binding.{q}" for q in queues)]
    removed = 0
    for i in range(0, len(keys), 500):
        removed += int(client.delete(*keys[i : i + 500]))
    return removed


def measure(n: int, redis_url: str, profile: str | None, rate_limit: str = "") -> Json:
    """Build the app on throwaway keys, run the three phases, clean up."""
    from web import create_app
    from worker.client import Keys
    from worker.settings import Settings

    tag = uuid.uuid4().hex[:8]
    prefix, queue, training = f"cxrbench-{tag}", f"inference-bench-{tag}", f"training-bench-{tag}"
    raw = redis.Redis.from_url(redis_url)
    images, source = load_images(64)
    bodies = [multipart(*images[i % len(images)]) for i in range(n)]
    # Process CPU, not wall time: a busy machine would otherwise charge others' time here.
    profiler = cProfile.Profile(time.process_time) if profile else None
    with tempfile.TemporaryDirectory(prefix="cxr-bench-submit-") as tmp:
        settings = Settings(
            redis_url=redis_url,
            model_dir=Path(tmp),
            key_prefix=prefix,
            inference_queue=queue,
            training_queue=training,
            rate_limit_uploads=rate_limit,
            rate_limit_status=rate_limit,
            max_queued_predictions=10 * n,
        )
        app = create_app({"TESTING": True, "CXR_SETTINGS": settings})
        client = app.test_client()
        keys = Keys(prefix)
        counter = RoundTrips()
        ids: list[str] = []
        try:
            fake_serving_worker(raw, prefix)
            # Warm up (first connections, lazy imports, Celery's producer pool), untimed.
            for body, ctype in bodies[:20]:
                assert (
                    client.post("/api/v1/predictions", data=body, content_type=ctype).status_code
                    == 202
                )
            raw.delete(queue)

            def submit(i: int) -> None:
                body, ctype = bodies[i]
                response = client.post("/api/v1/predictions", data=body, content_type=ctype)
                assert response.status_code == 202, response.get_data(as_text=True)
                ids.append(response.get_json()["id"])

            def poll(i: int) -> None:
                response = client.get(f"/api/v1/predictions/{ids[i]}")
                assert response.status_code == 200 and response.get_json()["status"] == "queued"

            def poll_wait(i: int) -> None:
                response = client.get(f"/api/v1/predictions/{ids[i]}?wait=20")
                assert response.status_code == 200

            def poll_done(i: int) -> None:
                response = client.get(f"/api/v1/predictions/{ids[i]}?wait=20")
                assert response.status_code == 200 and response.get_json()["status"] == "done"

            phases: Json = {}
            with counter.counting():
                phases["submit"] = timed(n, submit, counter, profiler)
                queued = int(raw.llen(queue))
                raw.delete(queue)
                phases["poll"] = timed(n, poll, counter, None)
                pipe = raw.pipeline(transaction=False)
                for job_id in ids:
                    pipe.rpush(keys.done(job_id), 1)
                pipe.execute()
                phases["poll_wait"] = timed(n, poll_wait, counter, None)
                finish(raw, keys, ids)
                phases["poll_done"] = timed(n, poll_done, counter, None)
            assert queued == n, f"{queued} messages queued for {n} submits"
        finally:
            removed = remove_keys(raw, prefix, [queue, training])
    report: Json = {"n": n, "images": source, "redis_url": redis_url, "rate_limit": rate_limit}
    report["phases"] = phases
    report["keys_removed"] = removed
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(profile or "tottime").print_stats(40)
        report["profile_submit_top"] = out.getvalue()
    return report


def table(report: Json) -> str:
    """The phases as a fixed-width table."""
    lines = [
        f"{'phase':<10} {'wall ms':>8} {'p50 ms':>8} {'CPU ms':>8} {'trips':>6} {'conns':>6}  "
        "commands per request"
    ]
    for name, p in report["phases"].items():
        commands = " ".join(f"{k}={v:g}" for k, v in p["commands_per_request"].items())
        lines.append(
            f"{name:<10} {p['wall_ms_mean']:>8.3f} {p['wall_ms_p50']:>8.3f} "
            f"{p['cpu_ms_mean']:>8.3f} {p['round_trips_per_request']:>6.2f} "
            f"{p['new_connections']:>6}  {commands}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse options, measure, print and save."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=2000, help="requests per phase")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="tottime",
        metavar="SORT",
        help="cProfile the submits (CPU time) and print the top 40 by SORT (tottime, cumulative)",
    )
    parser.add_argument(
        "--rate-limit",
        default="",
        metavar="SPEC",
        help="per-client limit of uploads and of status requests, e.g. '100000/second' to count "
        "what the limiter costs (default: off, as in bench.run)",
    )
    parser.add_argument("--label", default="", help="suffix of the results file, e.g. 'before'")
    args = parser.parse_args(argv)
    started = datetime.now(UTC)
    report = measure(args.n, args.redis_url, args.profile, args.rate_limit)
    report["started_at"] = started.isoformat(timespec="seconds")
    given = sys.argv[1:] if argv is None else list(argv)
    report["command"] = " ".join(["python -m bench.submit", *given])
    report["machine"] = machine()
    print(table(report))
    if "profile_submit_top" in report:
        print(report["profile_submit_top"])
    suffix = f"-{args.label}" if args.label else ""
    out = RESULTS / f"submit-{started:%Y-%m-%d}{suffix}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
