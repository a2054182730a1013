"""The TF-free side of the queue that the web process uses: Redis keys, submit and status.

An upload's bytes go to Redis under their own key with the same time-to-live as the job, and the
Celery message carries only the job id, so messages stay small, web and workers need no shared
disk, and nothing outlives its result.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from ml.imaging import (
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    UnsupportedModalityError,
    decode_upload,
    encode_png,
)
from ml.overlay import DEFAULT_OPACITY, render_from_stored
from worker.app import TASK_PREDICT
from worker.records import FINAL_STATES, PredictionStatus
from worker.settings import Settings

__all__ = [
    "DEFAULT_OPACITY",
    "CorruptImageError",
    "EmptyImageError",
    "ImageError",
    "ImageTooLargeError",
    "Keys",
    "NoModelError",
    "PredictionClient",
    "QueueFullError",
    "UnsupportedImageError",
    "UnsupportedModalityError",
    "WorkerInfo",
]

# Code is marked with backticks: the pages render those spans as <code> (web.pages.code_spans).
NO_MODEL_MESSAGE = (
    "No model version is active yet. Create one: with Docker Compose, "
    "`docker compose run --rm worker cxr init-model --base imagenet`; on a local install, "
    "`cxr init-model` (README, 'A first model'); such a version is untrained, its answers are "
    "not a diagnosis. Or put a dataset in ./data (train/ and test/, a folder per class) and "
    "restart the trainer (`docker compose restart trainer`): it then fine-tunes a first model "
    "by itself. Or import a trained one (`cxr import`) or promote one (`cxr promote N`). "
    "Running workers pick it up within seconds, no restart needed."
)


NO_MODEL_STATES = frozenset({"no_model", "error"})
"""Worker states in which a worker has no model to serve."""

SERVING_CHECK_SECONDS = 1.0
"""How long a web process takes "a live worker has a model" as still true without asking Redis.

Only that answer is kept, not a refusal: a model that appears is seen by the next upload, while
one that goes away (every worker reports ``no_model`` or ``error``) still has uploads queued for
up to this long instead of refused with 503; those wait for a model like uploads sent while no
worker runs. It saves two round trips per upload under load."""


class NoModelError(RuntimeError):
    """Workers are running but none of them has a model version to serve."""


class QueueFullError(RuntimeError):
    """As many predictions as ``CXR_MAX_QUEUED_PREDICTIONS`` wait already: try again later."""

    def __init__(self, queued: int, retry_after: int):
        super().__init__(
            f"{queued} predictions are waiting, the most this service queues; "
            f"try again in {retry_after} s"
        )
        self.retry_after = retry_after


@dataclass(frozen=True)
class Keys:
    """The Redis key layout, all under one prefix."""

    prefix: str = "cxr"

    def job(self, job_id: str) -> str:
        """Hash of one prediction job: status, timestamps, result JSON or error."""
        return f"{self.prefix}:job:{job_id}"

    def done(self, job_id: str) -> str:
        """A list that receives one token when the job finishes (for long-polling clients)."""
        return f"{self.prefix}:done:{job_id}"

    def upload(self, job_id: str) -> str:
        """The stored image of one job (a metadata-free PNG): kept as long as its result."""
        return f"{self.prefix}:upload:{job_id}"

    def heatmap(self, job_id: str) -> str:
        """The Grad-CAM map of one job's result (JSON: shape, values in [0, 1], class, layer)."""
        return f"{self.prefix}:heatmap:{job_id}"

    def worker(self, name: str) -> str:
        """Heartbeat of one worker process (JSON, expires when the process stops reporting)."""
        return f"{self.prefix}:worker:{name}"

    def worker_pattern(self) -> str:
        """Pattern matching every worker heartbeat key."""
        return f"{self.prefix}:worker:*"

    def workers(self) -> str:
        """Sorted set of worker heartbeat keys by the time each expires (an index: no SCAN)."""
        return f"{self.prefix}:workers"

    def active_version(self) -> str:
        """The number of the model version every worker should serve."""
        return f"{self.prefix}:model:active"

    def model_history(self) -> str:
        """Stack of previously active versions (newest first), for rollback."""
        return f"{self.prefix}:model:history"

    def model_audit(self) -> str:
        """List of JSON audit entries of pointer changes, newest first."""
        return f"{self.prefix}:model:audit"

    def eval_datasets(self) -> str:
        """Hash of the evaluation sets registered through the admin API: name -> JSON."""
        return f"{self.prefix}:eval:datasets"

    def model_events(self) -> str:
        """Pub/sub channel announcing pointer changes."""
        return f"{self.prefix}:model:events"

    def training_job(self, job_id: str) -> str:
        """Hash of one fine-tuning job: state, parameters, progress, outcome."""
        return f"{self.prefix}:train:{job_id}"

    def training_index(self) -> str:
        """Sorted set of fine-tuning job ids by creation time."""
        return f"{self.prefix}:train:jobs"

    def first_run(self) -> str:
        """Hash: what the first run (worker.first_run) decided: state, job id, reason."""
        return f"{self.prefix}:first-run"

    def first_run_lock(self) -> str:
        """Taken with SET NX by the trainer deciding the first run, so only one starts it."""
        return f"{self.prefix}:first-run:lock"


@dataclass(frozen=True)
class WorkerInfo:
    """What one worker process last reported about itself."""

    name: str
    state: str  # "loading", "serving", "no_model" or "error"
    model_version: int | None
    class_names: list[str] | None
    input_size: int | None
    error: str | None
    updated_at: float
    loaded_at: float | None = None  # when the served version finished loading
    precision: str | None = None  # what it computes in (known once the first load began)
    hardware: dict[str, Any] | None = None  # what chose it: CPU model, bf16 flags, GPUs

    @classmethod
    def from_json(cls, raw: bytes | str) -> WorkerInfo:
        """Parse a heartbeat written by the worker."""
        data: dict[str, Any] = json.loads(raw)
        return cls(
            name=data["name"],
            state=data["state"],
            model_version=data.get("model_version"),
            class_names=data.get("class_names"),
            input_size=data.get("input_size"),
            error=data.get("error"),
            updated_at=float(data.get("updated_at", 0.0)),
            loaded_at=data.get("loaded_at"),
            precision=data.get("precision"),
            hardware=data.get("hardware"),
        )

    def to_json(self) -> str:
        """Serialise for the heartbeat key."""
        return json.dumps(self.__dict__)


def as_text(value: bytes | str) -> str:
    """Decode a Redis reply that may be bytes."""
    return value.decode() if isinstance(value, bytes) else value


def new_job_id() -> str:
    """Return a fresh, unguessable job id."""
    return uuid.uuid4().hex


def is_job_id(value: str) -> bool:
    """Tell whether ``value`` has the shape of an id issued by :func:`new_job_id`."""
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


class PredictionClient:
    """Validates uploads, enqueues prediction tasks and reads their state from Redis."""

    def __init__(self, settings: Settings, redis_client: redis.Redis, celery: Celery):
        self.settings = settings
        self.redis = redis_client
        self.celery = celery
        self.keys = Keys(settings.key_prefix)
        # Until when (time.monotonic) a worker is known to be there with a model: see submit.
        self._serving_until = 0.0

    def submit(
        self,
        data: bytes,
        filename: str | None = None,
        explain: bool = True,
        ood_ignore: bool = False,
    ) -> str:
        """Validate an upload, store its normalised image and queue its prediction; return the id.

        What is stored is not the file but its decoded grayscale pixels, scaled down to at most
        ``ml.imaging.INTAKE_MAX_SIDE`` and written as a PNG without metadata: Redis memory per
        queued upload and the worker's decode do not grow with the file, and no metadata of the
        original travels on. For a DICOM that means no tag of the file (patient, study, dates)
        is stored anywhere: only its pixels, its size and the upload's file name. ``explain``
        travels in the job hash: ``False`` asks the worker for no Grad-CAM map.

        ``ood_ignore``: the request asked for the raw answer (``?ood=ignore``): the gate's
        verdict is not applied and the result says so (``ood_ignored``).

        Raises:
            QueueFullError: the queue holds ``max_queued_predictions`` already (checked first,
                so a flood is shed before its images are decoded).
            ImageError: the upload is not a usable PNG, JPEG or DICOM X-ray (nothing is queued).
            NoModelError: workers report that they have no model to serve.
        """
        limit = self.settings.max_queued_predictions
        serving_known = time.monotonic() < self._serving_until
        # One round trip before the decode: the queue's length and, unless a worker was seen
        # serving within SERVING_CHECK_SECONDS, the live workers' heartbeat keys.
        pipe = self.redis.pipeline(transaction=False)
        if limit:
            # The kombu queue is a Redis list: its length is the number of waiting messages.
            pipe.llen(self.settings.inference_queue)
        if not serving_known:
            self._queue_live_worker_keys(pipe)
        replies = pipe.execute()  # nothing to send (no bound, known serving): no round trip
        if limit:
            queued = int(replies[0])
            if queued >= limit:
                raise QueueFullError(queued, self.settings.queue_full_retry_after_seconds)
        image = decode_upload(data, max_pixels=self.settings.max_image_pixels)
        if not serving_known:
            workers = self._heartbeats(replies[-1])
            # With no worker at all the job waits in the queue; only refuse when the workers that
            # are there say they have nothing to serve.
            if workers and all(w.state in NO_MODEL_STATES for w in workers):
                raise NoModelError(NO_MODEL_MESSAGE)
            if workers:
                self._serving_until = time.monotonic() + SERVING_CHECK_SECONDS
        job_id = new_job_id()
        ttl = self.settings.result_ttl_seconds
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.upload(job_id), encode_png(image.pixels), ex=ttl)
        pipe.hset(
            self.keys.job(job_id),
            mapping={
                "status": "queued",
                "created_at": now,
                "filename": (filename or "")[:200],
                "bytes": len(data),
                "width": image.width,
                "height": image.height,
                **({"ood": "ignore"} if ood_ignore else {}),
                "explain": "1" if explain else "0",
            },
        )
        pipe.expire(self.keys.job(job_id), ttl)
        pipe.execute()
        # A message still queued when its upload has expired is dropped by the worker unrun.
        self.celery.send_task(
            TASK_PREDICT,
            args=[job_id],
            task_id=job_id,
            queue=self.settings.inference_queue,
            expires=ttl,
            # Nothing to declare: the message goes through the default exchange, which kombu's
            # Redis transport routes by the queue's name alone (an LPUSH onto that list) without
            # reading any binding, and the workers declare the queue they consume. Celery would
            # otherwise declare it again on every send (a cached no-op on Redis that still cost
            # ~0.24 ms of CPU per upload, most of a send).
            declare=[],
        )
        return job_id

    def status(self, job_id: str, wait: float = 0.0) -> dict[str, Any] | None:
        """The public state of a job as the API answers it (see :meth:`read`)."""
        record = self.read(job_id, wait)
        return record.to_dict() if record is not None else None

    def read(self, job_id: str, wait: float = 0.0) -> PredictionStatus | None:
        """Return the state of a job, or ``None`` when it is unknown or expired.

        With ``wait`` > 0, a job that is not finished yet is waited for, up to ``wait`` seconds
        (long polling: one request instead of many).
        """
        if not is_job_id(job_id):
            return None
        raw = self.redis.hgetall(self.keys.job(job_id))
        if raw and wait > 0 and as_text(raw.get(b"status", b"queued")) not in FINAL_STATES:
            done = self.keys.done(job_id)
            pipe = self.redis.pipeline(transaction=False)
            if self.redis.blpop([done], timeout=wait) is not None:
                # Put the token back for any other client waiting on the same job (in the same
                # round trip as the read of the result).
                pipe.rpush(done, 1)
                pipe.expire(done, self.settings.result_ttl_seconds)
            pipe.hgetall(self.keys.job(job_id))
            raw = pipe.execute()[-1]
        if not raw:
            return None
        return PredictionStatus.from_hash(job_id, {as_text(k): as_text(v) for k, v in raw.items()})

    def image_png(self, job_id: str) -> bytes | None:
        """The stored image of a job (pixels only, PNG), or ``None`` when unknown or expired."""
        if not is_job_id(job_id):
            return None
        data = self.redis.get(self.keys.upload(job_id))
        return data if isinstance(data, bytes) else None

    def heatmap_map(self, job_id: str) -> dict[str, Any] | None:
        """The Grad-CAM map document of a job, or ``None`` when it has none (off, expired)."""
        if not is_job_id(job_id):
            return None
        raw = self.redis.get(self.keys.heatmap(job_id))
        if raw is None:
            return None
        doc: dict[str, Any] = json.loads(raw)
        return doc

    def heatmap_png(self, job_id: str, opacity: float = DEFAULT_OPACITY) -> bytes | None:
        """The overlay of a job's map on its image (PNG), or ``None`` when either is missing."""
        if not is_job_id(job_id):
            return None
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.upload(job_id))
        pipe.get(self.keys.heatmap(job_id))
        image, heatmap = pipe.execute()
        if not isinstance(image, bytes) or heatmap is None:
            return None
        return render_from_stored(image, heatmap, opacity)

    def workers(self) -> list[WorkerInfo]:
        """Return the heartbeats of every live worker process."""
        pipe = self.redis.pipeline(transaction=False)
        self._queue_live_worker_keys(pipe)
        return self._heartbeats(pipe.execute()[-1])

    def _queue_live_worker_keys(self, pipe: redis.client.Pipeline) -> None:
        """Add to ``pipe`` what drops expired heartbeats and, last, lists the live ones' keys."""
        index = self.keys.workers()
        pipe.zremrangebyscore(index, "-inf", time.time())  # heartbeats that have expired
        pipe.zrange(index, 0, -1)

    def _heartbeats(self, names: list[bytes]) -> list[WorkerInfo]:
        """The heartbeats under ``names`` that still exist, by worker name."""
        if not names:
            return []
        infos = [WorkerInfo.from_json(raw) for raw in self.redis.mget(names) if raw is not None]
        return sorted(infos, key=lambda w: w.name)
