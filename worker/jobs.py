"""Fine-tuning jobs as the web process sees them: the request schema, submit, read, cancel.

TF-free. A job is a Redis hash (``<prefix>:train:<id>``) plus a Celery message on the training
queue carrying only the id; the trainer worker (``worker.training``) runs it.
"""

from __future__ import annotations

import json
import time
from pathlib import PurePosixPath
from typing import Any, Literal, cast

import redis
from celery import Celery
from pydantic import ConfigDict, Field, field_validator

from ml.config import Policy, TrainingOptions, limits, value_type
from worker.app import TASK_TRAIN
from worker.client import Keys, as_text, is_job_id, new_job_id
from worker.settings import Settings

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
JOB_STATES: tuple[JobState, ...] = ("queued", "running", "done", "failed", "cancelled")
FINAL_JOB_STATES = frozenset({"done", "failed", "cancelled"})
BASES = ("imagenet", "none", "active")
JOB_HISTORY = 1000


MAX_PATH_CHARS = 255
"""Longest ``dataset`` or ``base`` path a request may name (a file name's limit on most disks)."""


class TrainingRequest(TrainingOptions):
    """What an administrator may ask of a fine-tuning job (every field has a default).

    The training knobs, their limits, defaults and help are :class:`ml.config.TrainingOptions`'s;
    only what the service resolves itself (the dataset, the base, the promotion policy) is here.
    """

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        default=".",
        max_length=MAX_PATH_CHARS,
        description="Folder inside CXR_DATA_DIR in the Kaggle layout <split>/<CLASS>/*.",
    )
    base: str = Field(
        default="imagenet",
        max_length=MAX_PATH_CHARS,
        description="'imagenet', 'none', 'active' (continue from the active version), "
        "or a weights file path inside CXR_DATA_DIR.",
    )
    promotion: Policy | None = Field(
        default=None, description="Promotion policy; default CXR_PROMOTION_POLICY."
    )

    def knobs(self) -> dict[str, Any]:
        """The training knobs only, by :class:`ml.config.TrainConfig`'s names."""
        return self.model_dump(include=set(TrainingOptions.model_fields))

    @field_validator("dataset", "base")
    @classmethod
    def _inside_data_dir(cls, value: str) -> str:
        path = PurePosixPath(value)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError("must be a relative path inside CXR_DATA_DIR (no '..')")
        return value

    @field_validator("epochs_finetune")
    @classmethod
    def _some_epochs(cls, value: int, info: Any) -> int:
        if value == 0 and info.data.get("epochs_head") == 0:
            raise ValueError("epochs_head and epochs_finetune cannot both be 0")
        return value


def form_fields(names: tuple[str, ...]) -> list[dict[str, Any]]:
    """What the admin page's number inputs need: name, label, help, min, max, step, value."""
    rows = []
    for name in names:
        info = TrainingOptions.model_fields[name]
        low, high, _ = limits(TrainingOptions, name)
        kind = value_type(TrainingOptions, name)
        rows.append(
            {
                "name": name,
                "label": info.title,
                "help": info.description,
                "min": _number(low, kind),
                "max": _number(high, kind),
                "step": "1" if kind is int else "any",
                "value": "" if info.default is None else _number(info.default, kind),
                "placeholder": f"e.g. {info.examples[0]}" if info.examples else "",
            }
        )
    return rows


def _number(value: float | None, kind: type) -> str:
    """A limit or default as an HTML attribute: ``5``, ``0.001``, ``1e-05`` (empty: none)."""
    if value is None:
        return ""
    return str(int(value)) if kind is int else f"{value:g}"


class TrainingJobs:
    """Submits, lists, reads and cancels fine-tuning jobs."""

    def __init__(self, settings: Settings, redis_client: redis.Redis, celery: Celery):
        self.settings = settings
        self.redis = redis_client
        self.celery = celery
        self.keys = Keys(settings.key_prefix)

    def submit(self, request: TrainingRequest, actor: str) -> str:
        """Record a job and queue it on the training queue; return its id."""
        job_id = new_job_id()
        params = request.model_dump()
        params["promotion"] = params["promotion"] or self.settings.promotion_policy
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            self.keys.training_job(job_id),
            mapping={
                "status": "queued",
                "created_at": now,
                "actor": actor,
                "params": json.dumps(params),
            },
        )
        pipe.zadd(self.keys.training_index(), {job_id: now})
        # The index keeps the newest jobs; older job records are dropped with it.
        pipe.zremrangebyrank(self.keys.training_index(), 0, -JOB_HISTORY - 1)
        pipe.execute()
        try:
            self.celery.send_task(
                TASK_TRAIN, args=[job_id], task_id=job_id, queue=self.settings.training_queue
            )
        except Exception as exc:
            self.redis.hset(
                self.keys.training_job(job_id),
                mapping={"status": "failed", "error": f"could not be queued: {exc}"},
            )
            raise
        return job_id

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The public state of one job, or ``None`` if there is no such job."""
        if not is_job_id(job_id):
            return None
        raw = self.redis.hgetall(self.keys.training_job(job_id))
        if not raw:
            return None
        job = {as_text(k): as_text(v) for k, v in raw.items()}
        doc: dict[str, Any] = {"id": job_id, "status": job.get("status", "queued")}
        for name in ("created_at", "started_at", "finished_at"):
            if name in job:
                doc[name] = float(job[name])
        for name in ("actor", "error"):
            if name in job:
                doc[name] = job[name]
        for name in ("params", "progress", "outcome"):
            if name in job:
                doc[name] = json.loads(job[name])
        doc["cancel_requested"] = job.get("cancel_requested") == "1"
        return doc

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        """The most recent jobs, newest first."""
        index = self.keys.training_index()
        ids = cast(list[bytes], self.redis.zrevrange(index, 0, max(1, limit) - 1))
        docs = (self.get(as_text(i)) for i in ids)
        return [d for d in docs if d is not None]

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Ask a job to stop; a queued job is cancelled at once, a running one at its next batch."""
        key = self.keys.training_job(job_id)
        doc = self.get(job_id)
        if doc is None or doc["status"] in FINAL_JOB_STATES:
            return doc

        def mark(pipe: redis.client.Pipeline) -> None:
            raw = pipe.hget(key, "status")
            status = as_text(raw) if raw is not None else None
            if status is None or status in FINAL_JOB_STATES:
                return  # it finished meanwhile: nothing to cancel
            pipe.multi()
            pipe.hset(key, "cancel_requested", "1")
            if status == "queued":
                pipe.hset(key, mapping={"status": "cancelled", "finished_at": time.time()})

        self.redis.transaction(mark, key)
        return self.get(job_id)
