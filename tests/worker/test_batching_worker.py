"""Dynamic batching in a real worker (threads pool): batches form, and survive kill -9."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import WorkerProcess, make_settings, start_worker, wait_for
from tests.worker.test_integration import assert_well_formed, enqueue_raw, job_status, png_bytes

pytestmark = pytest.mark.integration


def test_concurrent_predictions_share_model_calls(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(redis_url, tiny_model_dir, batch_max_size=8, batch_max_delay_ms=20)
    worker = start_worker(settings, tmp_path, concurrency=8, pool="threads", name="batching")
    try:
        wait_for(lambda: worker.serving(1), 90, "the batching worker to serve")
        ids = [enqueue_raw(settings, png_bytes(i)) for i in range(40)]
        docs = []
        for job_id in ids:
            wait_for(
                lambda j=job_id: job_status(settings, j)["status"] == "done", 60, "a prediction"
            )
            docs.append(job_status(settings, job_id))
        for doc in docs:
            assert_well_formed(doc["result"])
        sizes = [doc["result"]["batch_size"] for doc in docs]
        assert max(sizes) > 1 and max(sizes) <= 8
    finally:
        worker.stop()


def test_worker_killed_mid_batch_loses_nothing(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """kill -9 while a batch is forming: every task of it is redelivered and completes."""
    # A long batch delay holds the delivered tasks inside the batcher, unacknowledged.
    slow = make_settings(redis_url, tiny_model_dir, batch_max_size=64, batch_max_delay_ms=5000)
    first = start_worker(slow, tmp_path, concurrency=8, pool="threads", name="doomed")
    second: WorkerProcess | None = None
    r = redis.Redis.from_url(redis_url)
    try:
        wait_for(lambda: first.serving(1), 90, "the first worker to serve")
        ids = [enqueue_raw(slow, png_bytes(100 + i)) for i in range(12)]
        # 8 delivered (one per thread), 4 still queued.
        wait_for(lambda: r.llen(slow.inference_queue) == 4, 10, "the worker to take 8 tasks")
        held = [i for i in ids if job_status(slow, i)["status"] == "running"]
        assert len(held) == 8
        first.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        assert all(job_status(slow, i)["status"] != "done" for i in ids)

        fast = slow.model_copy(update={"batch_max_delay_ms": 5.0})
        second = start_worker(fast, tmp_path, concurrency=8, pool="threads", name="rescuer")
        for job_id in ids:
            wait_for(lambda j=job_id: job_status(fast, j)["status"] == "done", 120, "every job")
        assert time.monotonic() - killed_at < 90
    finally:
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop()
