"""Dynamic batching in a real worker (threads pool): batches form, and survive kill -9."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.conftest import CLASSES, WorkerProcess, make_settings, start_worker, wait_for
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


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An active VGG16 at 224 px: a batch of 8 takes long enough (~0.5 s) to be killed mid-way."""
    import keras

    from ml.model import build_classifier
    from ml.versions import save_version, write_active_file

    model_dir = tmp_path_factory.mktemp("slow-models")
    keras.utils.set_random_seed(1)
    model = build_classifier(CLASSES, input_size=224, base_weights=None)
    save_version(model, model_dir, class_names=CLASSES, base_weights=None)
    write_active_file(model_dir, 1)
    return model_dir


def test_worker_killed_mid_batch_loses_nothing(
    redis_url: str, slow_model_dir: Path, tmp_path: Path
) -> None:
    """kill -9 while a batch runs: every task of it is redelivered and completes."""
    settings = make_settings(redis_url, slow_model_dir, batch_max_size=8, batch_max_delay_ms=50)
    first = start_worker(settings, tmp_path, concurrency=8, pool="threads", name="doomed")
    second: WorkerProcess | None = None
    try:
        wait_for(lambda: first.serving(1), 90, "the first worker to serve")
        ids = [enqueue_raw(settings, png_bytes(100 + i)) for i in range(12)]
        # 8 delivered (one per thread) and running, 4 still queued: kill now, mid-batch.
        wait_for(
            lambda: sum(job_status(settings, i)["status"] == "running" for i in ids) == 8,
            30,
            "8 tasks to be running",
            interval=0.005,
        )
        first.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        assert sum(job_status(settings, i)["status"] == "done" for i in ids) < 8

        second = start_worker(settings, tmp_path, concurrency=8, pool="threads", name="rescuer")
        for job_id in ids:
            wait_for(lambda j=job_id: job_status(settings, j)["status"] == "done", 120, "every job")
            assert_well_formed(job_status(settings, job_id)["result"])
        assert time.monotonic() - killed_at < 90
    finally:
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop()
