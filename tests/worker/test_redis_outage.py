"""A Redis outage for real: the compose worker command, a redis-server of this test's own that is
stopped for a while and started again on the same port and data, and a prediction afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
import redis
import yaml
from kombu.exceptions import OperationalError

from tests.conftest import (
    ROOT,
    WorkerProcess,
    free_port,
    make_settings,
    settings_env,
    wait_for,
)
from tests.worker.test_integration import assert_well_formed, enqueue_raw, job_status, png_bytes
from worker.app import create_celery
from worker.client import Keys, PredictionClient
from worker.settings import Settings

pytestmark = pytest.mark.integration

OUTAGE_SECONDS = 12.0
# From "Redis answers again" to "a prediction queued at that moment is done".
RECOVERY_BOUND_SECONDS = 1.0
# Restarts under load: how long Redis is down each time, the steady upload rate (per second, well
# below what the worker serves, so it always has a BRPOP waiting), and the bound on a prediction
# queued after a restart, with the backlog of the outage in front of it.
LOAD_OUTAGES_SECONDS = (0.5, 3.0, 0.5, 3.0, 1.0)
LOAD_RATE = 25.0
LOAD_RECOVERY_BOUND_SECONDS = 5.0


class RedisServer:
    """A throwaway redis-server on 127.0.0.1 that can be stopped and started on the same port.

    Append-only persistence in its own folder, as compose's Redis: queued messages, the unacked
    set and heartbeats survive a restart.
    """

    def __init__(self, workdir: Path) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.fail("redis-server is not installed (run `make test`, which installs it)")
        self.server = server
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the server; return the monotonic time it first answered a PING."""
        self.proc = subprocess.Popen(
            [self.server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return time.monotonic()
            except redis.ConnectionError:
                time.sleep(0.005)
        raise AssertionError("the throwaway redis-server did not start")

    def stop(self) -> None:
        """Stop the server (SIGTERM: it writes its append-only file and closes every client)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own (the shared one is never restarted)."""
    data = tmp_path / "redis"
    data.mkdir()
    server = RedisServer(data)
    server.start()
    yield server
    server.stop()


def compose_worker_argv(name: str) -> list[str]:
    """The command of a docker-compose.yml service, run with this interpreter's celery."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    argv = [str(a) for a in services[name]["command"]]
    assert argv[0] == "celery"
    return [sys.executable, "-m", "celery", *argv[1:]]


def start_compose_worker(settings: Settings, log_dir: Path) -> WorkerProcess:
    """The inference worker exactly as compose starts it, on ``settings``."""
    log_path = log_dir / f"worker-compose-{uuid.uuid4().hex[:6]}.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            compose_worker_argv("worker"), cwd=ROOT, env=settings_env(settings), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return WorkerProcess(settings, proc, log_path, redis.Redis.from_url(settings.redis_url))


def test_predictions_flow_within_a_second_after_a_redis_outage(
    redis_server: RedisServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Stop Redis for 12 s under a worker started as compose starts it; once Redis is back, a
    prediction is done within 1 s, and the worker logs no traceback nor deprecation warning."""
    # The compose command names the queue `inference`: this Redis is ours alone.
    settings = make_settings(redis_server.url, tiny_model_dir, inference_queue="inference")
    worker = start_compose_worker(settings, tmp_path)
    try:
        wait_for(lambda: worker.serving(1), 120, "the worker to serve")
        before = enqueue_raw(settings, png_bytes(11))
        wait_for(lambda: job_status(settings, before)["status"] == "done", 30, "a prediction")

        redis_server.stop()
        time.sleep(OUTAGE_SECONDS)
        assert worker.proc.poll() is None, f"the worker exited:\n{worker.log()[-4000:]}"
        back_at = redis_server.start()
        # Queued the moment Redis answers: it waits for the worker to reconnect.
        job_id = enqueue_raw(settings, png_bytes(12))
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=60)
        done_key = f"{settings.key_prefix}:done:{job_id}"
        assert client.blpop([done_key], timeout=30) is not None, worker.log()[-4000:]
        recovered_after = time.monotonic() - back_at
        doc = job_status(settings, job_id)
        assert doc["status"] == "done", doc
        assert_well_formed(doc["result"])
        figure = {"outage_s": OUTAGE_SECONDS, "recovered_after_s": round(recovered_after, 3)}
        print(json.dumps(figure))  # noqa: T201
        assert recovered_after < RECOVERY_BOUND_SECONDS, (recovered_after, worker.log()[-4000:])

        # Gossip is off (it failed with a traceback on every restart) and the connection-loss
        # setting is explicit (Celery warned at every reconnection while it was unset).
        log = worker.log()
        assert "Connection to broker lost" in log, "the outage did not reach the worker"
        assert "Traceback" not in log, log[-4000:]
        assert "Gossip" not in log, log[-4000:]
        assert "CPendingDeprecationWarning" not in log, log[-4000:]
        assert "worker_cancel_long_running_tasks_on_connection_loss" not in log, log[-4000:]
    finally:
        worker.stop()


class Load:
    """Uploads through the web's own client at a steady rate, in a thread, until stopped."""

    def __init__(self, settings: Settings, rate: float, limit: int = 5000) -> None:
        self.redis = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=0.2, socket_timeout=2
        )
        self.client = PredictionClient(settings, self.redis, create_celery(settings))
        self.rate, self.limit = rate, limit
        self.sent: deque[str] = deque(maxlen=limit)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def _run(self) -> None:
        image = png_bytes(21)
        while not self._stop.is_set() and len(self.sent) < self.limit:
            # While Redis is down the upload is refused (the web answers 503).
            with suppress(redis.RedisError, OperationalError, OSError):
                self.sent.append(self.client.submit(image, "load.png", explain=False))
            self._stop.wait(1 / self.rate)

    def running(self) -> bool:
        """Whether one of the latest uploads is being predicted: delivered, not acknowledged."""
        recent = list(self.sent)[-8:]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in recent:
            pipe.hget(self.client.keys.job(job_id), "status")
        return b"running" in pipe.execute()

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.client.celery.close()
        self.redis.close()


def test_a_worker_under_load_survives_redis_restarts(
    redis_server: RedisServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Issue 13: Redis restarted five times while the compose worker has predictions in flight.

    The worker stays up, and a prediction queued after each restart is done within a few seconds.
    Under load the worker used to exit on a restart (AttributeError "'NoneType' object has no
    attribute 'hostname'", see worker.consumer.RedisChannel): a task was delivered but not yet
    acknowledged and a BRPOP waiting when Redis went away.
    """
    settings = make_settings(redis_server.url, tiny_model_dir, inference_queue="inference")
    keys = Keys(settings.key_prefix)
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=0.2, socket_timeout=30)
    worker = start_compose_worker(settings, tmp_path)
    recoveries: list[float] = []
    in_flight: list[bool] = []
    try:
        wait_for(lambda: worker.serving(1), 120, "the worker to serve")
        with Load(settings, LOAD_RATE) as load:
            for outage in LOAD_OUTAGES_SECONDS:
                # Stop Redis the moment a prediction is running (delivered, not acknowledged).
                deadline = time.monotonic() + 10
                running = False
                while not running and time.monotonic() < deadline:
                    running = load.running()
                in_flight.append(running)
                redis_server.stop()
                time.sleep(outage)
                redis_server.start()
                queued_at = time.monotonic()
                job_id = load.client.submit(png_bytes(22), "after-restart.png", explain=False)
                done = client.blpop([keys.done(job_id)], timeout=LOAD_RECOVERY_BOUND_SECONDS)
                assert done is not None, (outage, recoveries, worker.log()[-6000:])
                recoveries.append(round(time.monotonic() - queued_at, 3))
                assert (load.client.status(job_id) or {}).get("status") == "done"
                assert worker.proc.poll() is None, worker.log()[-6000:]
        figure = {"outages_s": LOAD_OUTAGES_SECONDS, "in_flight": in_flight,
                  "recovered_after_s": recoveries, "uploads": len(load.sent)}  # fmt: skip
        print(json.dumps(figure))  # noqa: T201
        assert worker.proc.poll() is None, worker.log()[-6000:]
        log = worker.log()
        assert log.count("Connection to broker lost") >= len(LOAD_OUTAGES_SECONDS), log[-6000:]
        assert "Unrecoverable error" not in log, log[-6000:]
        assert "'hostname'" not in log, log[-6000:]
    finally:
        client.close()
        worker.stop()


def test_connection_loss_cancels_late_acked_tasks_for_redelivery() -> None:
    """Celery 6's default, set explicitly: a task whose connection was lost is cancelled and,
    acknowledged late and rejected when its worker is lost, delivered again."""
    settings = make_settings("redis://127.0.0.1:1/0", Path("models"))
    for role in ("inference", "trainer"):
        conf = create_celery(settings, role).conf  # type: ignore[arg-type]
        assert conf.worker_cancel_long_running_tasks_on_connection_loss is True
        assert conf.task_acks_late is True
        assert conf.task_reject_on_worker_lost is True


def test_a_predictions_redis_write_waits_out_an_outage(redis_server: RedisServer) -> None:
    """worker.runtime.through_outage: a write begun while Redis is down lands once it is back."""
    from threading import Thread

    from worker.runtime import through_outage

    client = redis.Redis.from_url(redis_server.url, socket_connect_timeout=0.2, socket_timeout=1)
    redis_server.stop()
    written: list[float] = []

    def write() -> None:
        through_outage(lambda: client.hset("job", mapping={"status": "done"}), wait=30)
        written.append(time.monotonic())

    writer = Thread(target=write)
    writer.start()
    time.sleep(2.0)
    assert not written  # still waiting: Redis is down
    back = redis_server.start()
    writer.join(10)
    assert written and written[0] - back < 3.0  # within one 2 s retry of Redis answering
    assert client.hget("job", "status") == b"done"


def test_an_outage_longer_than_the_wait_is_raised(redis_server: RedisServer) -> None:
    from worker.runtime import through_outage

    client = redis.Redis.from_url(redis_server.url, socket_connect_timeout=0.2, socket_timeout=1)
    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        through_outage(client.ping, wait=1.0)
    assert time.monotonic() - started < 3.0
