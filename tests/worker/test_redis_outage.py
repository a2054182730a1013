"""A Redis outage for real: the compose worker command, a redis-server of this test's own that is
stopped for a while and started again on the same port and data, and a prediction afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

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
from worker.settings import Settings

pytestmark = pytest.mark.integration

OUTAGE_SECONDS = 12.0
# From "Redis answers again" to "a prediction queued at that moment is done".
RECOVERY_BOUND_SECONDS = 1.0


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
