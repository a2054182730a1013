"""A throwaway cxr stack on 127.0.0.1 (redis-server, Celery worker, gunicorn) for benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: object, timeout: float, what: str) -> None:
    """Poll ``check()`` until true or raise after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except (redis.RedisError, requests.RequestException):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not up after {timeout} s")


@dataclass
class Stack:
    """URLs and folders of a running stack."""

    web_url: str
    redis_url: str
    model_dir: Path
    workdir: Path


@contextmanager
def run_stack(
    input_size: int, worker_concurrency: int = 1, web_workers: int = 2
) -> Iterator[Stack]:
    """Build an untrained model of ``input_size`` px and serve it; stop everything on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        model_dir = workdir / "models"
        subprocess.run(
            [sys.executable, "-m", "ml.cli", "--model-dir", str(model_dir), "init-model",
             "--base", "none", "--input-size", str(input_size)],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        rport, wport = free_port(), free_port()
        redis_url = f"redis://127.0.0.1:{rport}/0"
        procs.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(rport),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(workdir),
                ],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
        env |= {"CXR_REDIS_URL": redis_url, "CXR_MODEL_DIR": str(model_dir),
                "CXR_WORKER_HEARTBEAT_SECONDS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}  # fmt: skip
        wait_until(lambda: redis.Redis.from_url(redis_url).ping(), 10, "redis-server")
        log = (workdir / "worker.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "--app",
                    "worker.celery_app",
                    "worker",
                    "--queues",
                    "inference",
                    "--concurrency",
                    str(worker_concurrency),
                    "--without-gossip",
                    "--without-mingle",
                    "--loglevel",
                    "WARNING",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "--bind",
                    f"127.0.0.1:{wport}",
                    "--workers",
                    str(web_workers),
                    "--threads",
                    "4",
                    "web:create_app()",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        )
        web_url = f"http://127.0.0.1:{wport}"

        def serving() -> bool:
            doc = requests.get(f"{web_url}/readyz", timeout=2).json()
            states = [w["state"] for w in doc["workers"]]
            return len(states) == worker_concurrency and set(states) == {"serving"}

        wait_until(serving, 180, "the worker")
        yield Stack(web_url, redis_url, model_dir, workdir)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except PermissionError:
                    proc.terminate()
                except ProcessLookupError:
                    continue
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)
