"""The first run end to end: real trainer processes, an empty registry, a tiny dataset.

Two trainers start together on an empty registry with a dataset: exactly one first-run job is
submitted, it publishes version 1 and makes it active, and an inference worker answers with it
(marked trained). No command besides starting the processes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from ml.versions import list_versions, read_metadata
from tests.conftest import make_settings, start_worker, wait_for
from tests.worker.test_training_jobs import QUICK, jobs_of, synthetic_dataset, wait_final
from worker.app import create_celery
from worker.client import Keys, PredictionClient
from worker.first_run import ACTOR, read_record
from worker.registry import ActiveVersion

pytestmark = pytest.mark.integration


def xray_png() -> bytes:
    """A small grayscale PNG to classify."""
    pixels = np.random.default_rng(1).integers(0, 255, (48, 48)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_an_empty_registry_with_a_dataset_trains_and_serves_a_first_model(
    redis_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    synthetic_dataset(data / "chest_xray")  # as the Kaggle archive unpacks
    options = {k: v for k, v in QUICK.items()}
    settings = make_settings(
        redis_url, tmp_path / "models", data_dir=data, first_run_options=options
    )
    client = redis.Redis.from_url(redis_url)
    keys = Keys(settings.key_prefix)
    logs = tmp_path / "logs"
    logs.mkdir()
    trainers = [start_worker(settings, logs, trainer=True, name=f"trainer{i}") for i in range(2)]
    worker = None
    try:
        wait_for(lambda: all("ready" in t.log() for t in trainers), 90, "both trainers")
        wait_for(lambda: read_record(client, keys) is not None, 30, "the first-run record")
        record = read_record(client, keys)
        assert record is not None and record.state == "started", record
        assert record.dataset == "chest_xray" and record.job_id
        jobs = jobs_of(settings)
        doc = wait_final(jobs, record.job_id)
        logs_text = "\n".join(t.log()[-3000:] for t in trainers)
        assert doc["status"] == "done", (doc, logs_text)
        assert doc["actor"] == ACTOR
        assert doc["outcome"]["promotion"]["promoted"] is True
        assert list_versions(settings.model_dir) == [1]
        assert ActiveVersion(client, keys, settings.model_dir).get() == 1
        assert read_metadata(settings.model_dir, 1).trained is True
        # Exactly one job, though two trainers started on the empty registry.
        assert [j["id"] for j in jobs.list()] == [record.job_id]
        assert sum("first run: started" in t.log() for t in trainers) == 1, logs_text

        # A trainer started later leaves it alone (and keeps the record).
        late = start_worker(settings, logs, trainer=True, name="trainer-late")
        trainers.append(late)
        wait_for(lambda: "ready" in late.log(), 90, "the late trainer")
        wait_for(lambda: "first run:" in late.log(), 30, "its first-run decision")
        assert len(jobs.list()) == 1
        assert read_record(client, keys) == record

        # An inference worker answers with the trained version.
        worker = start_worker(settings, logs, name="inference", pool="threads", concurrency=2)
        wait_for(lambda: worker.serving(1), 90, "the worker to serve version 1")
        predictions = PredictionClient(settings, client, create_celery(settings))
        job_id = predictions.submit(xray_png(), "x.png")
        status = predictions.read(job_id, wait=30)
        assert status is not None and status.status == "done", status
        assert status.result is not None
        assert status.result.model_version == 1 and status.result.model_trained is True
    finally:
        for t in trainers:
            t.stop()
        if worker is not None:
            worker.stop()
