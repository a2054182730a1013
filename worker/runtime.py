"""Everything one worker process owns after the fork: Redis, the model holder, the heartbeat."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

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
from worker.records import (
    FINAL_STATES,
    Explanation,
    GateState,
    OutOfDistribution,
    PredictionResult,
    Timings,
)
from worker.registry import ActiveVersion
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

# How long a task waits for the first model load of a freshly started process.
FIRST_LOAD_WAIT_SECONDS = 120.0
# The explanation_reason of a result the out-of-distribution gate refused.
OOD_NOT_EXPLAINED = "no explanation: the image was refused as out of distribution"
# A prediction whose batch has not run by then fails instead of holding its task forever.
PREDICT_TIMEOUT_SECONDS = 300.0
# How long a prediction's own Redis writes wait out an outage. A task that raises on a lost
# connection is acknowledged as failed once the connection is back and never runs again (the
# soak, bench/soak.py, lost every prediction in flight across a Redis restart that way), so its
# reads and its result wait for Redis instead, well past a `docker compose restart redis`.
REDIS_OUTAGE_WAIT_SECONDS = 120.0

T = TypeVar("T")


def through_outage(call: Callable[[], T], wait: float = REDIS_OUTAGE_WAIT_SECONDS) -> T:
    """Run ``call``; while Redis is unreachable, retry it (0.25 s, doubling to 2 s) for ``wait`` s.

    For idempotent Redis work only (reads, ``HSET``, a transaction that sets fields and TTLs).
    After ``wait`` seconds the last connection error is raised.
    """
    deadline = time.monotonic() + wait
    delay = 0.25
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() + delay > deadline:
                raise
            log.warning("Redis unreachable: retrying in %.2f s", delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


class WorkerRuntime:
    """Serves prediction jobs in one process and reports what it serves."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.active = ActiveVersion(self.redis, self.keys, settings.model_dir)
        self.batcher = Batcher(
            lambda: self.holder.current(),  # the holder is made below
            max_batch=settings.batch_max_size,
            max_delay_s=settings.batch_max_delay_ms / 1000,
            on_batch=_record_batch,
            pad=settings.batch_padding,
        )
        self.holder = ModelHolder(
            settings.model_dir,
            wanted=self._wanted_version,
            precision=settings.precision,
            warm_batch_sizes=self.batcher.sizes if settings.batch_padding else (1,),
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

        def classify(gray: np.ndarray, explain: bool = False) -> BatchResult:
            nonlocal handed
            handed = True
            return self.batcher.predict(
                gray, timeout=PREDICT_TIMEOUT_SECONDS, announced=True, explain=explain
            )

        try:
            self._process(job_id, classify)
        finally:
            if not handed:
                self.batcher.withdraw()

    def _process(self, job_id: str, classify: Callable[[np.ndarray, bool], BatchResult]) -> None:
        job_key, upload_key = self.keys.job(job_id), self.keys.upload(job_id)

        def read() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hmget(job_key, ["status", "created_at", "explain", "ood"])
            pipe.get(upload_key)
            return pipe.execute()

        (status, created_at, explain_flag, ood_mode), data = through_outage(read)
        if status is None:
            log.warning("job %s expired before it was processed", job_id)
            self.redis.delete(upload_key)
            return
        if as_text(status) in FINAL_STATES:
            return  # A redelivered task whose result was already stored.
        started = time.time()
        if created_at is not None:
            metrics.QUEUE_WAIT.observe(max(0.0, started - float(created_at)))
        through_outage(
            lambda: self.redis.hset(job_key, mapping={"status": "running", "started_at": started})
        )
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
            explain, not_explained = self._explain_wanted(explain_flag)
            batch = classify(gray, explain)
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
            model_trained=classifier.trained,
        )
        if refusal:
            metrics.OOD_REFUSED.labels(model_version=str(classifier.version)).inc()
        heatmap_json = None
        if refusal is not None:
            # No label, so nothing to explain: a map of an image the gate does not recognise
            # would dress up a class the service did not report.
            result = dataclasses.replace(result, explanation_reason=OOD_NOT_EXPLAINED)
        elif batch.heatmap is not None:
            result, heatmap_json = self._with_explanation(job_id, result, batch)
        else:
            reason = batch.explanation_error if explain else not_explained
            result = dataclasses.replace(result, explanation_reason=reason)
        self._finish(job_id, result=result, heatmap_json=heatmap_json)

    def _explain_wanted(self, flag: bytes | None) -> tuple[bool, str | None]:
        """Whether this job gets a Grad-CAM map, and if not, why (the job's flag, the setting)."""
        if not self.settings.explain:
            return False, "explanations are turned off for this deployment (CXR_EXPLAIN=0)"
        if flag is not None and as_text(flag) == "0":
            return False, "explanation not requested (explain=0)"
        return True, None

    def _with_explanation(
        self, job_id: str, result: PredictionResult, batch: BatchResult
    ) -> tuple[PredictionResult, str | None]:
        """The result with its explanation, and the map's JSON for Redis (or the reason none)."""
        from ml.explain import METHOD, map_to_json  # TensorFlow is loaded already here

        heatmap = batch.heatmap
        assert heatmap is not None
        try:
            stored = json.dumps(map_to_json(heatmap))
        except Exception as exc:  # a map that cannot be stored must not fail the prediction
            log.exception("storing the Grad-CAM map of %s failed", job_id)
            return dataclasses.replace(result, explanation_reason=f"Grad-CAM failed: {exc}"), None
        explanation = Explanation.for_job(job_id, METHOD, heatmap.layer, heatmap.class_name)
        timings = dataclasses.replace(
            result.timings_ms,
            explain=round(batch.explain_s * 1000, 2) if batch.explain_s is not None else None,
        )
        return dataclasses.replace(result, explanation=explanation, timings_ms=timings), stored

    def _gate(self, batch: BatchResult, ignore: bool) -> tuple[GateState, OutOfDistribution | None]:
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
            return "mahalanobis", None
        refusal = OutOfDistribution(
            score=round(batch.ood_score, 3),
            threshold=round(gate.threshold, 3),
            reason=REASON,
            method=gate.method,
        )
        return "mahalanobis", refusal

    def _finish(
        self,
        job_id: str,
        *,
        result: PredictionResult | None = None,
        error: str | None = None,
        heatmap_json: str | None = None,
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
        ttl = self.settings.result_ttl_seconds
        through_outage(lambda: self._store(job_id, fields, ttl, result, heatmap_json))

    def _store(
        self,
        job_id: str,
        fields: dict[FieldT, EncodableT],
        ttl: int,
        result: PredictionResult | None,
        heatmap_json: str | None,
    ) -> None:
        """One transaction: the job's final fields, TTLs, the kept image and map, the token."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.job(job_id), mapping=fields)
        pipe.expire(self.keys.job(job_id), ttl)
        if result is not None:
            # The image stays as long as its result: the result page shows it (image.png) and
            # the overlay is drawn on it. It is the metadata-free PNG the web stored.
            pipe.expire(self.keys.upload(job_id), ttl)
        else:
            pipe.delete(self.keys.upload(job_id))
        if heatmap_json is not None:
            pipe.set(self.keys.heatmap(job_id), heatmap_json, ex=ttl)
        pipe.rpush(self.keys.done(job_id), 1)
        pipe.expire(self.keys.done(job_id), ttl)
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
