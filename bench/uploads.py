"""Cost of one upload by file size: web CPU, bytes held in Redis while queued, worker decode.

    .venv/bin/python -m bench.uploads            # ~1 min; prints a table, saves JSON

For each kind of file (the shared 256 px JPEGs and real-size X-rays made by ``tests.realsize``)
it posts the file to the web app in this process (Flask's test client, the body encoded
beforehand, so only the server's work is timed), with a real Redis behind it, and measures:

- web CPU: ``time.process_time()`` of the request (multipart parsing, decode, bound, PNG encode,
  the Redis transaction and the Celery publish), median of ``--repeat`` uploads;
- Redis: ``MEMORY USAGE`` of the upload key plus the job hash while the job is queued;
- worker decode: what the worker's decode step costs on what it reads from Redis, median.

Each row also gives the figures of the design before issue 7 (the original file held in Redis
and decoded at full resolution by the worker) measured in the same run. Writes
bench/results/uploads-<UTC date>.json with the machine's CPU model and flags.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart

from bench.machine import machine
from bench.stack import ROOT
from ml.imaging import decode_image
from tests.realsize import jpeg_xray, png16_xray, png_of_size, rgb_png_xray
from worker.client import Keys
from worker.settings import Settings

MiB = 1024 * 1024


def shared_jpeg() -> bytes:
    """One of the shared 256 px X-rays (what every earlier benchmark used)."""
    root = Path(os.environ.get("CXR_TEST_DATA_DIR", ROOT.parent / "shared/data/cxr-pneumonia-256"))
    paths = sorted(root.glob("test/PNEUMONIA/*.jp*g"))
    return paths[0].read_bytes() if paths else jpeg_xray(256, 256)


KINDS: list[tuple[str, Callable[[], bytes]]] = [
    ("shared 256 px JPEG", shared_jpeg),
    ("JPEG 1600x1300", lambda: jpeg_xray(1600, 1300)),
    ("JPEG 2100x1700", lambda: jpeg_xray(2100, 1700)),
    ("JPEG 2500x2048", lambda: jpeg_xray(2500, 2048)),
    ("JPEG 3000x2400", lambda: jpeg_xray(3000, 2400)),
    ("16-bit PNG 2500x2048", lambda: png16_xray(2500, 2048)),
    ("16-bit PNG 3000x3000", lambda: png16_xray(3000, 3000)),
    ("RGB PNG 2000x1700", lambda: rgb_png_xray(2000, 1700)),
    ("PNG 640x512 + 31 MiB", lambda: png_of_size(31 * MiB)),
]


def median_ms(fn: Callable[[], object], repeat: int, clock: Callable[[], float]) -> float:
    """Median milliseconds of ``fn`` by ``clock`` over ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1000)
    return round(statistics.median(times), 2)


def measure(
    name: str, data: bytes, app: Any, settings: Settings, r: redis.Redis, repeat: int
) -> Any:
    """One row: web CPU, Redis bytes and worker decode for ``data``, now and before issue 7."""
    keys = Keys(settings.key_prefix)
    boundary, body = encode_multipart({"file": [FileStorage(io.BytesIO(data), filename="x")]})
    client = app.test_client()
    ids: list[str] = []

    def post() -> None:
        response = client.post(
            "/api/v1/predictions",
            data=body,
            content_type=f"multipart/form-data; boundary={boundary}",
        )
        assert response.status_code == 202, response.get_data(as_text=True)
        ids.append(response.get_json()["id"])

    web_cpu = median_ms(post, repeat, time.process_time)
    job_id = ids[-1]
    stored = r.get(keys.upload(job_id))
    assert isinstance(stored, bytes)
    redis_bytes = int(r.memory_usage(keys.upload(job_id)) or 0)
    redis_bytes += int(r.memory_usage(keys.job(job_id)) or 0)
    decode_now = median_ms(lambda: decode_image(stored), repeat, time.perf_counter)
    # Before: the file itself in Redis, decoded at full resolution by the worker.
    probe = f"{settings.key_prefix}:probe"
    r.set(probe, data)
    redis_before = int(r.memory_usage(probe) or 0) + int(r.memory_usage(keys.job(job_id)) or 0)
    r.delete(probe)
    decode_before = median_ms(lambda: decode_image(data, max_side=None), repeat, time.perf_counter)
    height, width = decode_image(stored, max_side=None).shape
    return {
        "kind": name,
        "file_bytes": len(data),
        "stored": f"{width}x{height} PNG",
        "web_cpu_ms": web_cpu,
        "redis_bytes": redis_bytes,
        "redis_bytes_before": redis_before,
        "worker_decode_ms": decode_now,
        "worker_decode_ms_before": decode_before,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    """The results as a Markdown table."""
    print(
        "| file | size | stored | web CPU / upload | Redis / queued upload (before) "
        "| worker decode (before) |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['kind']} | {row['file_bytes'] / MiB:.2f} MiB | {row['stored']} "
            f"| {row['web_cpu_ms']:.0f} ms | {row['redis_bytes'] / 1024:.0f} KiB "
            f"({row['redis_bytes_before'] / 1024:.0f} KiB) | {row['worker_decode_ms']:.1f} ms "
            f"({row['worker_decode_ms_before']:.1f} ms) |"
        )


def main(argv: list[str] | None = None) -> None:
    """Measure every kind, print the table and save the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="uploads per kind (median)")
    parser.add_argument(
        "--redis-url", default=os.environ.get("CXR_REDIS_URL", Settings().redis_url)
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    from web import create_app

    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        redis_url=args.redis_url, key_prefix=f"cxrbench-{tag}", inference_queue=f"bench-{tag}"
    )
    app = create_app({"TESTING": True, "CXR_SETTINGS": settings})
    r = redis.Redis.from_url(args.redis_url)
    rows = []
    try:
        for name, make in KINDS:
            rows.append(measure(name, make(), app, settings, r, args.repeat))
            print(f"measured {name}", flush=True)
    finally:
        stale = [*r.scan_iter(match=f"{settings.key_prefix}:*"), settings.inference_queue]
        r.delete(*stale)
    print_table(rows)
    report = {"machine": machine(), "repeat": args.repeat, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"uploads-{datetime.now(UTC):%Y-%m-%d}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
