"""Shared fixtures: a real Redis, a tiny saved model, real Celery worker processes, the web app."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from worker.client import Keys
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TINY_SIZE = 32
CLASSES = ["NORMAL", "PNEUMONIA"]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: object, timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``predicate()`` until it is truthy or fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def run_python(
    code: str, *args: str, env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter at the checkout root (its own ``sys.modules``).

    ``args`` are its ``sys.argv[1:]``; its output is captured as text.
    """
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis for the whole run: $CXR_TEST_REDIS_URL if set, else a throwaway redis-server."""
    configured = os.environ.get("CXR_TEST_REDIS_URL")
    if configured:
        redis.Redis.from_url(configured).ping()
        yield configured
        return
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed (run `make test`, which installs it)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
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
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_for(up, 10, "the throwaway redis-server")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_client(redis_url: str) -> redis.Redis:
    """A client of the test Redis."""
    return redis.Redis.from_url(redis_url)


def make_settings(redis_url: str, model_dir: Path, **overrides: object) -> Settings:
    """Settings isolated by a unique key prefix and queue name."""
    tag = uuid.uuid4().hex[:8]
    values: dict[str, object] = {
        "redis_url": redis_url,
        "model_dir": model_dir,
        "key_prefix": f"cxrtest-{tag}",
        "inference_queue": f"inference-{tag}",
        "training_queue": f"training-{tag}",
        "worker_heartbeat_seconds": 0.5,
        "visibility_timeout_seconds": 4,
        "restore_interval_seconds": 1,
        "worker_metrics_port": 0,  # tests start many workers at once; one test turns it on
        # Every test client shares one address; the rate-limit tests turn limits on.
        "rate_limit_uploads": "",
        "rate_limit_status": "",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process use ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        # Complex settings are read back as JSON (pydantic-settings), not as Python's repr.
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        env[f"CXR_{name.upper()}"] = text
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder whose active version 1 is an untrained 32 px VGG16 classifier.

    Shared by the session: a test that changes the active version works on a copy.
    """
    import keras

    from ml.model import build_classifier
    from ml.versions import save_version, write_active_file

    model_dir = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(0)
    model = build_classifier(CLASSES, input_size=TINY_SIZE, base_weights=None)
    save_version(model, model_dir, class_names=CLASSES, base_weights=None)
    write_active_file(model_dir, 1)
    return model_dir


@dataclass
class WorkerProcess:
    """A real ``celery worker`` subprocess and how to reach what it serves."""

    settings: Settings
    proc: subprocess.Popen[bytes]
    log_path: Path
    redis: redis.Redis = field(repr=False)

    def heartbeats(self) -> list[dict[str, object]]:
        """The worker heartbeats under this worker's key prefix."""
        keys = list(self.redis.scan_iter(match=Keys(self.settings.key_prefix).worker_pattern()))
        return [json.loads(raw) for raw in self.redis.mget(keys) if raw] if keys else []

    def serving(self, version: int | None = None) -> bool:
        """Whether every reporting process serves a model (``version`` if given)."""
        beats = self.heartbeats()
        return bool(beats) and all(
            b["state"] == "serving" and (version is None or b["model_version"] == version)
            for b in beats
        )

    def log(self) -> str:
        """The worker's output so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the worker (and its pool processes)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def start_worker(
    settings: Settings,
    log_dir: Path,
    concurrency: int = 1,
    name: str = "w",
    trainer: bool = False,
    pool: str = "prefork",
) -> WorkerProcess:
    """Start ``celery worker`` (inference, or the trainer) in its own process group."""
    log_path = log_dir / f"worker-{name}-{uuid.uuid4().hex[:6]}.log"
    app = "worker.trainer_app" if trainer else "worker.celery_app"
    queue = settings.training_queue if trainer else settings.inference_queue
    cmd = [
        sys.executable, "-m", "celery", "--app", app, "worker",
        "--queues", queue, "--concurrency", str(concurrency),
        "--pool", pool, "--hostname", f"{name}-{uuid.uuid4().hex[:6]}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO",
    ]  # fmt: skip
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=settings_env(settings), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return WorkerProcess(settings, proc, log_path, redis.Redis.from_url(settings.redis_url))


def start_trainer(settings: Settings, log_dir: Path) -> WorkerProcess:
    """Start a trainer worker and wait until it is ready (stopped again, with its log, if not)."""
    worker = start_worker(settings, log_dir, trainer=True, name="trainer")
    try:
        wait_for(lambda: "ready" in worker.log(), 60, "the trainer to start")
    except AssertionError:
        worker.stop()
        raise AssertionError(f"trainer did not start:\n{worker.log()[-4000:]}") from None
    return worker


@pytest.fixture(scope="session")
def worker_settings(redis_url: str, tiny_model_dir: Path) -> Settings:
    """Settings shared by the session's worker and the apps that talk to it."""
    return make_settings(redis_url, tiny_model_dir)


@pytest.fixture(scope="session")
def live_worker(
    worker_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A real Celery worker with two pool processes serving the tiny model."""
    worker = start_worker(worker_settings, tmp_path_factory.mktemp("logs"), concurrency=2)
    try:
        wait_for(
            lambda: len(worker.heartbeats()) == 2 and worker.serving(1), 90, "the worker to serve"
        )
    except AssertionError:
        worker.stop()
        raise AssertionError(f"worker did not start serving:\n{worker.log()[-4000:]}") from None
    yield worker
    worker.stop()


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    """Settings with their own key prefix and queue, and an empty model folder (no worker)."""
    return make_settings(redis_url, tmp_path / "models")


@pytest.fixture
def app(settings: Settings) -> Flask:
    """The web app on isolated settings, with no worker behind it."""
    from web import create_app

    return create_app({"TESTING": True, "CXR_SETTINGS": settings})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of :func:`app`."""
    return app.test_client()


@pytest.fixture
def live_app(worker_settings: Settings, live_worker: WorkerProcess) -> Flask:
    """The web app talking to the session's real worker."""
    from web import create_app

    return create_app({"TESTING": True, "CXR_SETTINGS": worker_settings})


EVALUATION = {"accuracy": 0.91, "sensitivity": 0.95, "specificity": 0.84, "roc_auc": 0.96, "n": 40}


def curves_png() -> bytes:
    """A small real PNG standing in for a version's training curves."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((40, 20)).save(buffer, "PNG")
    return buffer.getvalue()


def link_model(src: str, dst: str) -> None:
    """copytree's copy function: symlink the weights, copy everything else."""
    if Path(src).name == "model.keras":
        os.symlink(src, dst)
    else:
        shutil.copy2(src, dst)


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A registry with versions 1 (the tiny model) and 2 (a trained-looking copy with
    evaluation and curves); none active. For tests that never load the weights."""
    root = tmp_path / "models"
    for version in ("1", "2"):
        # The web never opens model.keras: a link to the shared one will do.
        shutil.copytree(tiny_model_dir / "1", root / version, copy_function=link_model)
    meta_path = root / "2" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta.update(
        version=2,
        parent_version=1,
        training_seconds=12.5,
        job_id="a" * 32,
        trained=True,
        metrics={k: EVALUATION[k] for k in ("accuracy", "sensitivity", "specificity", "roc_auc")},
    )
    meta_path.write_text(json.dumps(meta))
    (root / "2" / "evaluation.json").write_text(json.dumps(EVALUATION))
    (root / "2" / "curves.png").write_bytes(curves_png())
    return root
