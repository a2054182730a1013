"""Everything one worker process owns after the fork: Redis, the model holder, the heartbeat."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable

import numpy as np
import redis
from redis.typing import EncodableT, FieldT

from ml.imaging import ImageError, decode_image
from ml.ood import REASON, gate_off_path
from ml.versions import version_dir
from worker import metrics
from worker.batcher import Batcher, BatchResult, NoModelAvailable
from worker.client import NO_MODEL_MESSAGE, Keys, WorkerInfo, as_text
from worker.holder import ModelHolder
from worker.records import FINAL_STATES, PredictionResult, Timings
from worker.registry import ActiveVersion
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

# How long a task waits for the first model load of a freshly started process.
FIRST_LOAD_WAIT_SECONDS = 120.0
# A prediction whose batch has not run by then fails instead of holding its task forever.
PREDICT_TIMEOUT_SECONDS = 300.0


class WorkerRuntime:
    """Serves prediction jobs in one process and reports what it serves."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.active = ActiveVersion(self.redis, self.keys, settings.model_dir)
        self.holder = ModelHolder(
            settings.model_dir, wanted=self._wanted_version, precision=settings.precision
        )
        self.batcher = Batcher(
            self.holder.current,
            max_batch=settings.batch_max_size,
            max_delay_s=settings.batch_max_delay_ms / 1000,
            on_batch=_record_batch,
        )
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._wake = threading.Event()

    def start(self) -> None:
        """Start the threads that load the model, watch the active version and report."""
        self._safe_heartbeat()  # "loading"
        threading.Thread(target=self._watch, name="cxr-model-watch", daemon=True).start()
        threading.Thread(target=self._listen, name="cxr-model-events", daemon=True).start()
        # Its own thread: loading a model can take longer than the heartbeat's lifetime, and a
        # process that is loading a new version still serves the old one.
        threading.Thread(target=self._beat, name="cxr-heartbeat", daemon=True).start()

    def stop(self) -> None:
        """Stop reporting and remove this process's heartbeat."""
        self._stop.set()
        self._wake.set()
        try:
            self.redis.delete(self.keys.worker(self.name))
            self.redis.zrem(self.keys.workers(), self.keys.worker(self.name))
        except redis.RedisError:
            log.warning("could not remove heartbeat of %s", self.name)

    def heartbeat(self) -> None:
        """Write this process's state to Redis (expires if the process stops reporting)."""
        clf = self.holder.current()
        info = WorkerInfo(
            name=self.name,
            state=self.holder.state,
            model_version=clf.version if clf else None,
            class_names=clf.class_names if clf else None,
            input_size=clf.input_size if clf else None,
            error=self.holder.error,
            updated_at=time.time(),
            loaded_at=self.holder.loaded_at,
            precision=self.holder.precision,
            hardware=self.holder.hardware.to_dict() if self.holder.hardware else None,
        )
        ttl = max(2, math.ceil(self.settings.worker_heartbeat_seconds * 3))
        key = self.keys.worker(self.name)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(key, info.to_json(), ex=ttl)
        pipe.zadd(self.keys.workers(), {key: time.time() + ttl})
        pipe.execute()

    def _wanted_version(self) -> int | None:
        try:
            return self.active.get()
        except redis.RedisError as exc:
            log.warning("cannot read the active version: %s", exc)
            serving = self.holder.current()
            return serving.version if serving else None

    def _watch(self) -> None:
        # Once per period, or as soon as a pointer change is announced: load the active version
        # if it changed, and report what is served now.
        while not self._stop.is_set():
            self.holder.refresh()
            self._safe_heartbeat()
            self._wake.wait(self.settings.worker_heartbeat_seconds)
            self._wake.clear()

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.worker_heartbeat_seconds):
            self._safe_heartbeat()

    def _listen(self) -> None:
        # Pub/sub makes a swap start within milliseconds; the periodic check above still covers
        # a missed message (a reconnect, a Redis restart).
        while not self._stop.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.keys.model_events())
                for message in pubsub.listen():
                    if self._stop.is_set():
                        return
                    if message and message.get("type") == "message":
                        self._wake.set()
            except redis.RedisError as exc:
                log.warning("model events subscription lost: %s", exc)
                self._stop.wait(1.0)

    def _safe_heartbeat(self) -> None:
        try:
            self.heartbeat()
        except redis.RedisError as exc:
            log.warning("heartbeat failed: %s", exc)

    def process(self, job_id: str) -> None:
        """Classify the upload of one job and store its result or error."""
        self.batcher.announce()
        handed = False

        def classify(gray: np.ndarray) -> BatchResult:
            nonlocal handed
            handed = True
            return self.batcher.predict(gray, timeout=PREDICT_TIMEOUT_SECONDS, announced=True)

        try:
            self._process(job_id, classify)
        finally:
            if not handed:
                self.batcher.withdraw()

    def _process(self, job_id: str, classify: Callable[[np.ndarray], BatchResult]) -> None:
        job_key, upload_key = self.keys.job(job_id), self.keys.upload(job_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(job_key, ["status", "created_at", "ood"])
        pipe.get(upload_key)
        (status, created_at, ood_mode), data = pipe.execute()
        if status is None:
            log.warning("job %s expired before it was processed", job_id)
            self.redis.delete(upload_key)
            return
        if as_text(status) in FINAL_STATES:
            return  # A redelivered task whose result was already stored.
        started = time.time()
        if created_at is not None:
            metrics.QUEUE_WAIT.observe(max(0.0, started - float(created_at)))
        self.redis.hset(job_key, mapping={"status": "running", "started_at": started})
        if not isinstance(data, bytes):
            self._finish(job_id, error="The upload expired before a worker could process it.")
            return
        if self.holder.current(timeout=FIRST_LOAD_WAIT_SECONDS) is None:
            self._finish(job_id, error=NO_MODEL_MESSAGE)
            return
        try:
            t0 = time.perf_counter()
            gray = decode_image(data, max_pixels=self.settings.max_image_pixels)
            t1 = time.perf_counter()
            batch = classify(gray)
        except ImageError as exc:
            self._finish(job_id, error=f"Image rejected by the worker: {exc}")
            return
        except NoModelAvailable:
            self._finish(job_id, error=NO_MODEL_MESSAGE)
            return
        classifier = batch.classifier
        prediction = classifier.to_prediction(batch.probabilities)
        gate, refusal = self._gate(
            batch, ignore=ood_mode is not None and as_text(ood_mode) == "ignore"
        )
        queued_ms = (started - float(created_at)) * 1000 if created_at else None
        result = PredictionResult(
            label=None if refusal else prediction.label,
            probabilities=prediction.probabilities,
            model_version=classifier.version,
            decision_threshold=classifier.decision_threshold,
            batch_size=batch.batch_size,
            timings_ms=Timings(
                queue=round(queued_ms, 2) if queued_ms is not None else None,
                decode=round((t1 - t0) * 1000, 2),
                batch_wait=round(batch.waited_s * 1000, 2),
                model=round(batch.model_s * 1000, 2),
                worker_total=round((time.time() - started) * 1000, 2),
            ),
            precision=classifier.precision,
            out_of_distribution=refusal,
            gate=gate,
            ood_ignored=gate == "ignored",
        )
        if refusal:
            metrics.OOD_REFUSED.labels(model_version=str(classifier.version)).inc()
        self._finish(job_id, result=result)

    def _gate(self, batch: BatchResult, ignore: bool) -> tuple[str, dict[str, object] | None]:
        """Which gate applied (mahalanobis/none/off/ignored) and the refusal, if it refused."""
        gate = batch.classifier.gate
        if gate is None or batch.ood_score is None:
            return "none", None
        version = batch.classifier.version
        if not self.settings.ood_gate or (
            version is not None
            and gate_off_path(version_dir(self.settings.model_dir, version)).exists()
        ):
            return "off", None
        if ignore:
            return "ignored", None
        if batch.ood_score <= gate.threshold:
            return gate.method, None
        refusal = {
            "score": round(batch.ood_score, 3),
            "threshold": round(gate.threshold, 3),
            "reason": REASON,
            "method": gate.method,
        }
        return gate.method, refusal

    def _finish(
        self, job_id: str, *, result: PredictionResult | None = None, error: str | None = None
    ) -> None:
        status = "done" if error is None else "failed"
        version = str(result.model_version) if result else "none"
        metrics.PREDICTIONS.labels(model_version=version, status=status).inc()
        fields: dict[FieldT, EncodableT] = {
            "status": status,
            "finished_at": time.time(),
        }
        if result is not None:
            fields["result"] = result.to_json()
        if error is not None:
            fields["error"] = error
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.job(job_id), mapping=fields)
        pipe.expire(self.keys.job(job_id), self.settings.result_ttl_seconds)
        pipe.delete(self.keys.upload(job_id))
        pipe.rpush(self.keys.done(job_id), 1)
        pipe.expire(self.keys.done(job_id), self.settings.result_ttl_seconds)
        pipe.execute()


def _record_batch(size: int, seconds: float, version: int | None) -> None:
    metrics.BATCH_SIZE.observe(size)
    metrics.MODEL_SECONDS.observe(seconds)


_runtime: WorkerRuntime | None = None
_runtime_pid: int | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    """Return this process's runtime, creating and starting it on first use after a fork."""
    global _runtime, _runtime_pid
    with _runtime_lock:  # the threads pool runs tasks on many threads of one process
        if _runtime is None or _runtime_pid != os.getpid():
            _runtime = WorkerRuntime(get_settings())
            _runtime_pid = os.getpid()
            _runtime.start()
        return _runtime


def stop_runtime() -> None:
    """Stop this process's runtime if it was started."""
    if _runtime is not None and _runtime_pid == os.getpid():
        _runtime.stop()
