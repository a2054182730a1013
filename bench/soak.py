"""Soak under faults: steady load while a worker dies, Redis restarts and a version swaps.

    .venv/bin/python -m bench.soak                       # 600 s at 80 % of the measured capacity
    .venv/bin/python -m bench.soak --duration 120 --rate 20

Its own redis-server (append-only file on, so a restart keeps queued work), gunicorn (2 gthread
workers) and two inference workers (threads pool), serving a small untrained VGG16 (64 px) with a
second version beside it; real X-rays from ``$CXR_TEST_DATA_DIR``. Uploads arrive open-loop at
``--rate`` per second (default: 80 % of a short closed-loop capacity measurement); each client
long-polls its result. At 25 % of the run one worker is killed with ``kill -9`` and restarted a
second later (as a supervisor would), at 50 % Redis is stopped for ~5 s and started again on the
same port and data, at 75 % the active version is changed (hot swap). Afterwards, once every
accepted upload is final or the drain time is over, it checks that every accepted upload got
exactly one final answer (none lost, none finished twice: each finish pushes one token on the
job's ``done`` list, whose length a long-poll leaves unchanged), counts 5xx inside and outside
the Redis outage (only 503 is allowed inside), and reports p50/p99 upload-to-answer latency
before, during and after each fault. A table is printed and the JSON saved under
``bench/results/``. Everything listens on 127.0.0.1; the load is bounded in rate and time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import requests

from bench.configs import RESULTS
from bench.loadgen import load_images, percentile
from bench.stack import ROOT, free_port, make_model, wait_until
from worker.client import as_text

INPUT_SIZE = 64
WORKERS = 2
THREADS = 8
POLL_WAIT = 10  # ?wait= of each status request
Json = dict[str, Any]


@dataclass
class Upload:
    """One upload as its client saw it (times in seconds since the start of the load)."""

    index: int
    at: float
    status: int | None = None  # of the POST; None: no HTTP answer
    answered_post: float | None = None  # when the POST's answer (or its failure) came
    error: str | None = None  # the JSON error code of a refused POST
    job_id: str | None = None
    final: str | None = None  # done / failed
    answered_at: float | None = None
    model_version: int | None = None
    result: Json | None = None
    poll_errors: list[tuple[float, int | None]] = field(default_factory=list)


class Soak:
    """The processes of one soak run, and the faults done to them."""

    def __init__(self, workdir: Path, visibility_timeout: int):
        self.workdir = workdir
        self.model_dir = workdir / "models"
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.web_url = f"http://127.0.0.1:{free_port()}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")} | {
            "CXR_REDIS_URL": self.redis_url,
            "CXR_MODEL_DIR": str(self.model_dir),
            "CXR_WORKER_HEARTBEAT_SECONDS": "1",
            "CXR_VISIBILITY_TIMEOUT_SECONDS": str(visibility_timeout),
            "CXR_RESTORE_INTERVAL_SECONDS": "2",
            "CXR_RATE_LIMIT_UPLOADS": "",  # one client address at a steady rate
            "CXR_RATE_LIMIT_STATUS": "",
            "CXR_WORKER_METRICS_PORT": "0",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": str(ROOT),
        }

    def start(self, name: str, cmd: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        log.close()

    def start_redis(self) -> None:
        self.start("redis", [
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--dir", str(self.workdir),
        ])  # fmt: skip
        wait_until(lambda: redis.Redis.from_url(self.redis_url).ping(), 15, "redis-server")

    def start_worker(self, i: int) -> None:
        self.start(f"worker{i}", [
            sys.executable, "-m", "celery", "--app", "worker.celery_app", "worker",
            "--queues", "inference", "--pool", "threads", "--concurrency", str(THREADS),
            "--hostname", f"soak{i}@%h", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "--loglevel", "WARNING",
        ])  # fmt: skip

    def start_all(self) -> None:
        make_model("vgg16", INPUT_SIZE, self.model_dir)  # version 1, active
        make_model("vgg16", INPUT_SIZE, self.model_dir)  # version 2, the hot swap's target
        from ml.versions import write_active_file

        write_active_file(self.model_dir, 1)
        self.start_redis()
        for i in range(WORKERS):
            self.start_worker(i)
        self.start("web", [
            sys.executable, "-m", "gunicorn", "--config", "python:web.gunicorn_conf",
            "--bind", self.web_url.removeprefix("http://"), "--workers", "2",
            "--threads", "32", "--log-level", "warning", "web:create_app()",
        ])  # fmt: skip
        wait_until(lambda: self.serving() == [1] * WORKERS, 240, "both workers serving")

    def supervise(self, stop: threading.Event, t0: float, events: list[Json]) -> None:
        """Restart any inference worker that exited, a second later (compose's restart policy)."""
        while not stop.wait(0.5):
            for i in range(WORKERS):
                proc = self.procs[f"worker{i}"]
                if proc.poll() is None:
                    continue
                events.append({"at": round(time.monotonic() - t0, 2), "worker": i,
                               "exit_code": proc.returncode})  # fmt: skip
                time.sleep(1.0)
                self.start_worker(i)

    def names(self) -> set[str]:
        """The names (host:pid) of the worker processes serving now."""
        doc = requests.get(f"{self.web_url}/readyz", timeout=3).json()
        return {w["name"] for w in doc.get("workers", []) if w["state"] == "serving"}

    def serving(self) -> list[int | None]:
        """The version each live worker process serves (from /readyz)."""
        doc = requests.get(f"{self.web_url}/readyz", timeout=3).json()
        return sorted(w["model_version"] for w in doc.get("workers", []) if w["state"] == "serving")

    def signal(self, name: str, sig: int) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, sig)
        self.procs[name].wait(30)

    def stop_all(self) -> None:
        for name in list(self.procs):
            with suppress(subprocess.TimeoutExpired):
                self.signal(name, signal.SIGTERM)
            with suppress(ProcessLookupError):
                os.killpg(self.procs[name].pid, signal.SIGKILL)


def upload(soak: Soak, up: Upload, image: tuple[str, bytes], t0: float, deadline: float) -> None:
    """POST one X-ray, then long-poll its result until it is final or ``deadline``."""
    name, data = image
    session = requests.Session()
    try:
        r = session.post(
            f"{soak.web_url}/api/v1/predictions", files={"file": (name, data)}, timeout=30
        )
        up.status = r.status_code
        up.answered_post = time.monotonic() - t0
        if r.status_code != 202:
            with suppress(ValueError):
                up.error = r.json().get("error")
            return
        up.job_id = r.json()["id"]
    except requests.RequestException:
        up.answered_post = time.monotonic() - t0
        return
    url = f"{soak.web_url}/api/v1/predictions/{up.job_id}?wait={POLL_WAIT}"
    while time.monotonic() < deadline:
        try:
            r = session.get(url, timeout=POLL_WAIT + 10)
        except requests.RequestException:
            up.poll_errors.append((time.monotonic() - t0, None))
            time.sleep(0.5)
            continue
        if r.status_code != 200:
            up.poll_errors.append((time.monotonic() - t0, r.status_code))
            time.sleep(0.5)
            continue
        doc = r.json()
        if doc["status"] in ("done", "failed"):
            up.final = doc["status"]
            up.answered_at = time.monotonic() - t0
            up.result = doc.get("result")
            up.model_version = (doc.get("result") or {}).get("model_version")
            return


def capacity(soak: Soak, images: list[tuple[str, bytes]], seconds: float = 10.0) -> float:
    """Predictions per second of 16 closed-loop clients (upload, then wait) for ``seconds``."""
    done: list[float] = []
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        i = k
        while time.monotonic() < stop:
            up = Upload(i, 0.0)
            upload(soak, up, images[i % len(images)], time.monotonic(), stop + 30)
            if up.final == "done":
                done.append(time.monotonic())
            i += 16

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(1 for t in done if t <= stop) / (stop - start)


def faults(soak: Soak, duration: float, t0: float, log: list[Json]) -> None:
    """The three faults at 25 %, 50 % and 75 % of the run; each logs its start and end."""
    try:
        _faults(soak, duration, t0, log)
    except Exception as exc:  # the load goes on; the report says which fault did not finish
        log.append(
            {"fault": "error", "error": f"{type(exc).__name__}: {exc}", "start": 0, "end": 0}
        )


def _faults(soak: Soak, duration: float, t0: float, log: list[Json]) -> None:

    def at(fraction: float) -> None:
        time.sleep(max(0.0, t0 + fraction * duration - time.monotonic()))

    def now() -> float:
        return round(time.monotonic() - t0, 2)

    at(0.25)
    start = now()
    before = soak.names()
    soak.signal("worker0", signal.SIGKILL)  # Soak.supervise starts it again a second later
    # Until its successor serves (the dead one's heartbeat lives on for a few seconds).
    wait_until(lambda: len(soak.names() - before) == 1 and soak.serving() == [1] * WORKERS,
               120, "the restarted worker")  # fmt: skip
    log.append({"fault": "kill -9 worker", "start": start, "end": now()})

    at(0.50)
    start = now()
    soak.signal("redis", signal.SIGTERM)  # as `docker compose restart redis` does
    time.sleep(5.0)
    soak.start_redis()
    back = now()
    wait_until(lambda: soak.serving() == [1] * WORKERS, 90, "workers after the Redis restart")
    log.append({"fault": "Redis restart", "start": start, "end": now(), "redis_back": back})

    at(0.75)
    start = now()
    from worker.client import Keys
    from worker.registry import ActiveVersion

    pointer = ActiveVersion(redis.Redis.from_url(soak.redis_url), Keys("cxr"), soak.model_dir)
    pointer.set(2, actor="bench.soak", reason="hot swap under load")
    wait_until(lambda: soak.serving() == [2] * WORKERS, 60, "both workers on version 2")
    log.append({"fault": "hot swap 1 -> 2", "start": start, "end": now()})


def latency_ms(ups: list[Upload], lo: float, hi: float) -> Json:
    """p50/p99 upload-to-answer (ms) of the uploads sent in ``[lo, hi)`` that got an answer."""
    values = [(u.answered_at - u.at) * 1000 for u in ups if lo <= u.at < hi and u.answered_at]
    if not values:
        return {"n": 0, "p50": None, "p99": None}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50)),
        "p99": round(percentile(values, 99)),
    }


def analyse(soak: Soak, ups: list[Upload], log: list[Json], duration: float) -> Json:
    """Answers per accepted upload, 5xx inside and outside the outage, latency per fault phase."""
    client = redis.Redis.from_url(soak.redis_url)
    accepted = [u for u in ups if u.status == 202]
    finishes = {u.job_id: int(client.llen(f"cxr:done:{u.job_id}")) for u in accepted}
    lost = [u.job_id for u in accepted if u.final is None]
    lost_states: dict[str, int] = {}  # where the lost ones stopped
    for job_id in lost:
        raw = client.hget(f"cxr:job:{job_id}", "status")
        state = as_text(raw) if raw is not None else "missing"
        lost_states[state] = lost_states.get(state, 0) + 1
    twice = [j for j, n in finishes.items() if n > 1]
    changed = []  # the stored answer differs from the one the client saw: answered again
    for u in accepted:
        raw = client.hget(f"cxr:job:{u.job_id}", "result")
        if u.result is not None and raw is not None and json.loads(raw) != u.result:
            changed.append(u.job_id)
    outage = next((f for f in log if f["fault"] == "Redis restart"), None)
    lo, hi = (outage["start"], outage["redis_back"] + 1.0) if outage else (-1.0, -1.0)

    def inside(t: float) -> bool:
        return lo <= t < hi

    # Classified by when the answer came: an upload scheduled before the outage may be sent in it.
    codes: list[tuple[float, int | None]] = [(u.answered_post or u.at, u.status) for u in ups]
    codes += [e for u in ups for e in u.poll_errors]
    bad_out = [c for t, c in codes if not inside(t) and (c is None or c >= 500)]
    bad_in = [c for t, c in codes if inside(t) and (c is None or c >= 500)]
    window = max(5.0, 0.08 * duration)
    phases = []
    for f in (f for f in log if f["fault"] != "error"):
        phases.append({
            "fault": f["fault"],
            "before": latency_ms(ups, f["start"] - window, f["start"]),
            "during": latency_ms(ups, f["start"], f["end"]),
            "after": latency_ms(ups, f["end"], f["end"] + window),
        })  # fmt: skip
    by_status: dict[str, int] = {}
    for u in ups:
        key = str(u.status) + (f" {u.error}" if u.error else "")
        by_status[key] = by_status.get(key, 0) + 1
    return {
        "uploads": len(ups),
        "post_status": by_status,
        "accepted": len(accepted),
        "answered": sum(1 for u in accepted if u.final),
        "failed_answers": sum(1 for u in accepted if u.final == "failed"),
        "lost": len(lost),
        "lost_ids": lost[:20],
        "lost_states": lost_states,
        "finished_twice": len(twice),
        "answer_changed": len(changed),
        "versions": sorted({u.model_version for u in accepted if u.model_version is not None}),
        "5xx_outside_outage": len(bad_out),
        "5xx_outside_outage_codes": sorted({str(c) for c in bad_out}),
        "5xx_inside_outage": len(bad_in),
        "non_503_inside_outage": sum(1 for c in bad_in if c != 503),
        "outage_window_s": [round(lo, 2), round(hi, 2)],
        "latency": phases,
        "latency_all": latency_ms(ups, 0, duration),
    }


def print_table(report: Json) -> None:
    a = report["analysis"]
    print(f"\nsoak: {report['duration_s']} s at {report['rate']} uploads/s (capacity measured "
          f"{report['capacity']} predictions/s), {a['uploads']} uploads")  # fmt: skip
    print(f"  POST status: {a['post_status']}; accepted {a['accepted']}, answered {a['answered']} "
          f"(failed {a['failed_answers']}), lost {a['lost']}, finished twice "
          f"{a['finished_twice']}, answer changed {a['answer_changed']}")  # fmt: skip
    print(f"  5xx outside the outage: {a['5xx_outside_outage']} {a['5xx_outside_outage_codes']}; "
          f"inside: {a['5xx_inside_outage']} (non-503: {a['non_503_inside_outage']})")  # fmt: skip
    print(f"  lost uploads stopped in: {a['lost_states']}")
    for f in report["faults"]:
        print(f"  {f['fault']}: {f['start']} s -> {f['end']} s {f.get('error', '')}")
    for e in report["worker_exits"]:
        print(f"  worker {e['worker']} exited at {e['at']} s with {e['exit_code']} (restarted)")
    print(f"\n  {'fault':<18} {'before p50/p99':>16} {'during p50/p99':>16} {'after p50/p99':>16}")
    for p in a["latency"]:
        cells = [f"{p[k]['p50']}/{p[k]['p99']} ms" for k in ("before", "during", "after")]
        print(f"  {p['fault']:<18} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (>= 60)")
    parser.add_argument(
        "--rate", type=float, help="uploads per second (default: 80 %% of capacity)"
    )
    parser.add_argument(
        "--visibility-timeout", type=int, default=60,
        help="CXR_VISIBILITY_TIMEOUT_SECONDS: when the killed worker's tasks are redelivered",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, help="JSON file (default bench/results/soak-<date>.json)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the folder with the logs")
    args = parser.parse_args(argv)
    if args.duration < 60:
        parser.error("--duration must be at least 60 s (faults need room)")
    images, source = load_images(64)
    workdir = Path(tempfile.mkdtemp(prefix="cxr-soak-"))
    soak = Soak(workdir, args.visibility_timeout)
    try:
        soak.start_all()
        measured = round(capacity(soak, images), 1)
        rate = args.rate or round(0.8 * measured, 1)
        print(f"capacity {measured} predictions/s; soak at {rate} uploads/s for {args.duration} s")
        ups: list[Upload] = []
        log: list[Json] = []
        t0 = time.monotonic()
        drain = args.visibility_timeout + 40
        exits: list[Json] = []
        stop = threading.Event()
        supervisor = threading.Thread(target=soak.supervise, args=(stop, t0, exits), daemon=True)
        supervisor.start()
        fault_thread = threading.Thread(target=faults, args=(soak, args.duration, t0, log))
        fault_thread.start()
        # Open loop: uploads are sent on schedule whatever the answers do; latency counts from
        # the scheduled time, so a stall shows up in it.
        pool = ThreadPoolExecutor(max_workers=max(32, int(rate * 12)))
        n = int(args.duration * rate)
        for i in range(n):
            time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            up = Upload(i, round(i / rate, 3))
            ups.append(up)
            pool.submit(upload, soak, up, images[i % len(images)], t0, t0 + args.duration + drain)
        pool.shutdown(wait=True)
        fault_thread.join()
        stop.set()
        supervisor.join()
        report = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "python -m bench.soak " + " ".join(argv or sys.argv[1:]),
            "duration_s": args.duration, "rate": rate, "capacity": measured,
            "images": source, "model": f"VGG16 {INPUT_SIZE} px, random weights",
            "workers": f"{WORKERS} x celery threads pool, concurrency {THREADS}",
            "web": "gunicorn 2 gthread workers x 32 threads",
            "visibility_timeout_s": args.visibility_timeout,
            "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
            "faults": log,
            "worker_exits": exits,  # the kill -9 and any crash; each restarted 1 s later
            "analysis": analyse(soak, ups, log, args.duration),
        }  # fmt: skip
        out = args.out or RESULTS / f"soak-{datetime.now(UTC):%Y-%m-%d}.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        print_table(report)
        print(f"\nsaved {out}")
    finally:
        soak.stop_all()
        if args.keep:
            print(f"logs and data in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
