"""The first run's rule, lock and record (worker.first_run) against a real Redis; no trainer."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import ValidationError

from tests.conftest import make_settings
from worker.app import create_celery
from worker.client import Keys
from worker.first_run import (
    ACTOR,
    SCRATCH_DEFAULTS,
    FirstRun,
    FirstRunRecord,
    build_request,
    decide,
    find_dataset,
    read_record,
)
from worker.settings import Settings


def dataset_at(root: Path) -> Path:
    """An (empty) Kaggle-layout folder: train/ and test/ with a folder per class."""
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture
def data_settings(redis_url: str, tmp_path: Path) -> Settings:
    """Settings with an empty registry and a data folder holding one dataset, ``xray``."""
    dataset_at(tmp_path / "data" / "xray")
    return make_settings(redis_url, tmp_path / "models", data_dir=tmp_path / "data")


def started(job_id: str = "a" * 32) -> FirstRunRecord:
    return FirstRunRecord("started", "", 1.0, job_id=job_id, dataset="xray")


# --- the rule ---------------------------------------------------------------------------------


def test_an_empty_registry_with_a_dataset_starts_one(data_settings: Settings) -> None:
    decision = decide(data_settings, [], None, None, "xray", 5.0)
    assert decision.start and decision.dataset == "xray" and decision.record is None


@pytest.mark.parametrize(
    ("overrides", "versions", "dataset", "state"),
    [
        ({"first_run": False}, [], "xray", "disabled"),
        ({}, [1], "xray", "not_needed"),
        ({}, [], None, "no_dataset"),
    ],
)
def test_reasons_not_to_start(
    data_settings: Settings,
    overrides: dict[str, Any],
    versions: list[int],
    dataset: str | None,
    state: str,
) -> None:
    settings = data_settings.model_copy(update=overrides)
    decision = decide(settings, versions, None, None, dataset, 5.0)
    assert not decision.start
    assert decision.record is not None and decision.record.state == state
    assert decision.record.reason and "`" not in decision.record.reason


@pytest.mark.parametrize("status", ["queued", "running", "done"])
def test_a_first_run_under_way_or_done_is_never_started_twice(
    data_settings: Settings, status: str
) -> None:
    decision = decide(data_settings, [], started(), status, "xray", 5.0)
    assert not decision.start and decision.record is None  # the old record stays


@pytest.mark.parametrize("status", ["failed", "cancelled", None])
def test_a_failed_cancelled_or_vanished_first_run_is_tried_again(
    data_settings: Settings, status: str | None
) -> None:
    assert decide(data_settings, [], started(), status, "xray", 5.0).start


def test_find_dataset(tmp_path: Path, redis_url: str) -> None:
    root = tmp_path / "data"
    settings = make_settings(redis_url, tmp_path / "m", data_dir=root)
    assert find_dataset(settings) is None  # no folder at all
    root.mkdir()
    (root / "notes").mkdir()
    assert find_dataset(settings) is None
    dataset_at(root / "b-set")
    dataset_at(root / "a-set")
    assert find_dataset(settings) == "a-set"  # the first by name
    dataset_at(root)
    assert find_dataset(settings) == "."  # the data folder itself
    named = settings.model_copy(update={"first_run_dataset": "b-set"})
    assert find_dataset(named) == "b-set"
    missing = settings.model_copy(update={"first_run_dataset": "nope"})
    assert find_dataset(missing) is None


def test_options_override_the_defaults(data_settings: Settings) -> None:
    request = build_request(data_settings, "xray", imagenet=False)
    assert request.base == "none" and request.input_size == SCRATCH_DEFAULTS["input_size"]
    assert request.intensity == "equalize"  # the ablation's recipe (docs/external-validation.md)
    assert request.promotion == "if_better" and request.dataset == "xray"
    assert build_request(data_settings, "xray", imagenet=True).base == "imagenet"
    tuned = data_settings.model_copy(update={"first_run_options": {"input_size": 64}})
    assert build_request(tuned, "xray", imagenet=True).input_size == 64
    bad = data_settings.model_copy(update={"first_run_options": {"epochs": 3}})
    with pytest.raises(ValidationError):
        build_request(bad, "xray", imagenet=True)


def test_options_are_read_from_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_FIRST_RUN_OPTIONS", json.dumps({"epochs_head": 2}))
    monkeypatch.setenv("CXR_FIRST_RUN", "false")
    settings = Settings()
    assert settings.first_run_options == {"epochs_head": 2} and settings.first_run is False


# --- the lock and the record, on a real Redis -------------------------------------------------


def first_run(settings: Settings, name: str = "trainer-a") -> FirstRun:
    client = redis.Redis.from_url(settings.redis_url)
    return FirstRun(settings, client, create_celery(settings), name)


def training_messages(settings: Settings) -> int:
    return int(redis.Redis.from_url(settings.redis_url).llen(settings.training_queue))


def test_check_submits_one_job_and_keeps_the_record(data_settings: Settings) -> None:
    runner = first_run(data_settings)
    record = runner.check()
    assert record is not None and record.state == "started" and record.job_id
    assert read_record(runner.redis, runner.keys) == record
    job = runner.jobs.get(record.job_id)
    assert job is not None and job["actor"] == ACTOR and job["status"] == "queued"
    assert job["params"]["dataset"] == "xray" and job["params"]["promotion"] == "if_better"
    assert training_messages(data_settings) == 1
    assert runner.redis.get(runner.keys.first_run_lock()) is None  # released

    # A second trainer start (or a restart) while it is queued: nothing new.
    again = first_run(data_settings, "trainer-b").check()
    assert again == record and training_messages(data_settings) == 1

    # Failed: the next start tries again, with a new job.
    runner.redis.hset(runner.keys.training_job(record.job_id), "status", "failed")
    retry = first_run(data_settings, "trainer-b").check()
    assert retry is not None and retry.state == "started" and retry.job_id != record.job_id
    assert training_messages(data_settings) == 2


def test_a_held_lock_keeps_a_second_trainer_out(data_settings: Settings) -> None:
    runner = first_run(data_settings)
    runner.redis.set(runner.keys.first_run_lock(), "trainer-other", ex=30)
    assert runner.check() is None  # decided by the lock holder, which wrote nothing yet
    assert training_messages(data_settings) == 0
    assert runner.redis.get(runner.keys.first_run_lock()) == b"trainer-other"  # not ours
    assert 0 < int(runner.redis.ttl(runner.keys.first_run_lock())) <= 30


def test_trainers_starting_together_submit_one_job(data_settings: Settings) -> None:
    runners = [first_run(data_settings, f"trainer-{i}") for i in range(6)]
    barrier = threading.Barrier(len(runners))

    def go(runner: FirstRun) -> None:
        barrier.wait()
        runner.check()

    threads = [threading.Thread(target=go, args=(r,)) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert training_messages(data_settings) == 1
    record = read_record(runners[0].redis, Keys(data_settings.key_prefix))
    assert record is not None and record.state == "started"


def test_records_of_the_reasons(data_settings: Settings, tmp_path: Path) -> None:
    empty = data_settings.model_copy(update={"data_dir": tmp_path / "nothing"})
    record = first_run(empty).check()
    assert record is not None and record.state == "no_dataset"
    assert str(tmp_path / "nothing") in record.reason
    bad = data_settings.model_copy(update={"first_run_options": {"input_size": 8}})
    record = first_run(bad).check()
    assert record is not None and record.state == "error" and "input_size" in record.reason
    assert training_messages(data_settings) == 0
