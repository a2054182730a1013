"""Fine-tuning jobs on a real trainer worker: publish, promote, cancel, fail, redeliver."""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image

from ml.layers import intensity_of
from ml.versions import list_versions, load_model, read_evaluation, read_metadata
from tests.conftest import WorkerProcess, make_settings, start_trainer, wait_for
from worker.app import TASK_TRAIN, create_celery
from worker.client import Keys
from worker.jobs import TrainingJobs, TrainingRequest
from worker.registry import ActiveVersion
from worker.settings import Settings

pytestmark = pytest.mark.integration

QUICK = {"input_size": 32, "epochs_head": 1, "epochs_finetune": 1, "base": "none",
         "max_images_per_class": 6, "batch_size": 8, "augment": False}  # fmt: skip


def synthetic_dataset(root: Path) -> None:
    """A small Kaggle-layout set: bright-centred 'PNEUMONIA' vs dark 'NORMAL' images."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 80, (48, 48)).astype(np.uint8)
                pixels[16:32, 16:32] += np.uint8(120 * label)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="PNG")
                (folder / f"{cls}-{i}.png").write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``(CXR_DATA_DIR, dataset)``: the real X-rays when available, else a synthetic set."""
    real = os.environ.get("CXR_TEST_DATA_DIR")
    if real:
        return Path(real).parent, Path(real).name
    root = tmp_path_factory.mktemp("data")
    synthetic_dataset(root / "synthetic")
    return root, "synthetic"


@pytest.fixture(scope="module")
def trainer_env(
    redis_url: str, tiny_model_dir: Path, data: tuple[Path, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Settings, WorkerProcess]]:  # fmt: skip
    """A real trainer worker on its own model folder (a copy holding active version 1)."""
    model_dir = tmp_path_factory.mktemp("trainer") / "models"
    shutil.copytree(tiny_model_dir, model_dir)
    settings = make_settings(redis_url, model_dir, data_dir=data[0])
    worker = start_trainer(settings, tmp_path_factory.mktemp("logs"))
    yield settings, worker
    worker.stop()


def jobs_of(settings: Settings) -> TrainingJobs:
    """A job client on the settings."""
    return TrainingJobs(settings, redis.Redis.from_url(settings.redis_url), create_celery(settings))


def wait_final(jobs: TrainingJobs, job_id: str, timeout: float = 240) -> dict[str, Any]:
    """Poll a job until it is final; returns the last document and every progress seen."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = jobs.get(job_id)
        assert doc is not None
        if doc.get("progress") and doc["progress"] not in seen:
            seen.append(doc["progress"])
        if doc["status"] in ("done", "failed", "cancelled"):
            return doc | {"seen_progress": seen}
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not finished after {timeout} s: {jobs.get(job_id)}")


def test_jobs_publish_versions_and_apply_the_promotion_policy(
    trainer_env: tuple[Settings, WorkerProcess], data: tuple[Path, str]
) -> None:
    settings, worker = trainer_env
    jobs = jobs_of(settings)
    active = ActiveVersion(jobs.redis, Keys(settings.key_prefix), settings.model_dir)
    before = list_versions(settings.model_dir)

    first = TrainingRequest(dataset=data[1], promotion="always", intensity="equalize", **QUICK)
    job = jobs.submit(first, "test")
    doc = wait_final(jobs, job)
    assert doc["status"] == "done", (doc, worker.log()[-3000:])
    version = doc["outcome"]["version"]
    assert list_versions(settings.model_dir) == [*before, version]
    assert doc["outcome"]["promotion"]["promoted"] is True
    assert active.get() == version
    training = [p for p in doc["seen_progress"] if p.get("stage") == "training"]
    assert training and training[-1]["epoch"] == 2 and training[-1]["phase"] == 2
    meta = read_metadata(settings.model_dir, version)
    assert meta.job_id == job and meta.dataset["files"] > 0 and meta.training_seconds
    assert meta.hyperparameters["input_size"] == 32
    assert meta.hyperparameters["intensity"] == "equalize"
    assert intensity_of(load_model(settings.model_dir, version)) == "equalize"
    evaluation = read_evaluation(settings.model_dir, version)
    assert evaluation is not None
    assert {"accuracy", "sensitivity", "specificity", "roc_auc"} <= set(evaluation)
    assert (settings.model_dir / str(version) / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert active.audit(1)[0]["actor"] == f"training job {job}"

    # "never": a new candidate, the active version untouched; this one labels at a threshold.
    # It continues the active version, so it keeps that version's intensity layer (the request
    # left the option at its default).
    second = QUICK | {"base": "active", "promotion": "never", "target_sensitivity": 1.0}
    request2 = TrainingRequest.model_validate(second | {"dataset": data[1]})
    job2 = jobs.submit(request2, "test")
    doc2 = wait_final(jobs, job2)
    assert doc2["status"] == "done", (doc2, worker.log()[-3000:])
    meta2 = read_metadata(settings.model_dir, doc2["outcome"]["version"])
    assert meta2.parent_version == version and meta2.hyperparameters["intensity"] == "equalize"
    assert doc2["outcome"]["promotion"]["promoted"] is False
    assert active.get() == version
    threshold = read_metadata(settings.model_dir, doc2["outcome"]["version"]).decision_threshold
    assert isinstance(threshold, float)
    assert read_evaluation(settings.model_dir, doc2["outcome"]["version"])["threshold"] == threshold

    # "if_better": scored against the active version on the same test split.
    job3 = jobs.submit(TrainingRequest(dataset=data[1], promotion="if_better", **QUICK), "test")
    doc3 = wait_final(jobs, job3)
    promotion = doc3["outcome"]["promotion"]
    assert promotion["active_version"] == version and promotion["active"] is not None
    assert promotion["promoted"] == (promotion["candidate"] >= promotion["active"])
    assert active.get() == (doc3["outcome"]["version"] if promotion["promoted"] else version)


def test_cancel_a_running_job(
    trainer_env: tuple[Settings, WorkerProcess], data: tuple[Path, str]
) -> None:
    settings, _ = trainer_env
    jobs = jobs_of(settings)
    before, active = (
        list_versions(settings.model_dir),
        jobs.redis.get(Keys(settings.key_prefix).active_version()),
    )
    slow = QUICK | {"epochs_head": 500, "patience": 100}
    job = jobs.submit(TrainingRequest(dataset=data[1], promotion="always", **slow), "test")
    wait_for(
        lambda: (jobs.get(job) or {}).get("progress", {}).get("stage") == "training", 120,
        "the job to train",
    )  # fmt: skip
    asked = time.monotonic()
    jobs.cancel(job)
    doc = wait_final(jobs, job, timeout=60)
    assert doc["status"] == "cancelled"
    assert time.monotonic() - asked < 30
    assert list_versions(settings.model_dir) == before
    assert jobs.redis.get(Keys(settings.key_prefix).active_version()) == active


def test_cancel_a_queued_job_and_failures_leave_nothing(
    trainer_env: tuple[Settings, WorkerProcess], data: tuple[Path, str]
) -> None:
    settings, _ = trainer_env
    jobs = jobs_of(settings)
    before = list_versions(settings.model_dir)
    # Queued behind nothing it would start at once: cancel before it is sent.
    queued = TrainingJobs(settings, jobs.redis, create_celery(settings))
    job_id = queued.submit(TrainingRequest(dataset=data[1], **QUICK), "test")
    queued.cancel(job_id)
    assert wait_final(jobs, job_id)["status"] == "cancelled"

    missing = jobs.submit(TrainingRequest(dataset="no-such-set", **QUICK), "test")
    doc = wait_final(jobs, missing)
    assert doc["status"] == "failed" and "no-such-set" in doc["error"]

    empty = settings.data_dir / f"empty-{missing[:6]}"
    (empty / "train" / "NORMAL").mkdir(parents=True)
    (empty / "train" / "PNEUMONIA").mkdir(parents=True)
    (empty / "test").mkdir()
    bad = jobs.submit(TrainingRequest(dataset=empty.name, **QUICK), "test")
    doc = wait_final(jobs, bad)
    assert doc["status"] == "failed" and doc["error"], doc
    shutil.rmtree(empty)
    assert list_versions(settings.model_dir) == before


def test_redelivered_job_never_publishes_twice(
    trainer_env: tuple[Settings, WorkerProcess], data: tuple[Path, str]
) -> None:
    settings, _ = trainer_env
    jobs = jobs_of(settings)
    job = jobs.submit(TrainingRequest(dataset=data[1], promotion="never", **QUICK), "test")
    doc = wait_final(jobs, job)
    assert doc["status"] == "done"
    versions = list_versions(settings.model_dir)
    # As if the trainer died after publishing but before acknowledging: the message comes back.
    jobs.redis.hset(Keys(settings.key_prefix).training_job(job), "status", "running")
    jobs.celery.send_task(TASK_TRAIN, args=[job], queue=settings.training_queue)
    wait_for(lambda: (jobs.get(job) or {}).get("status") == "done", 60, "the redelivery")
    again = jobs.get(job)
    assert again is not None and again["outcome"] == {
        "version": doc["outcome"]["version"],
        "redelivered": True,
    }
    assert list_versions(settings.model_dir) == versions
