"""The fine-tuning task, run by the trainer worker only (queue ``training``, concurrency 1).

dataset → :func:`ml.training.train` → a new registry version → :func:`ml.promotion.decide`
(the active version re-scored on the run's own test split). Progress is
written to the job's Redis hash after every epoch and every few seconds during one; cancellation
is checked at every batch. A cancelled or failed job publishes nothing and leaves the active
version alone; a redelivered job whose version was already published is marked done, never
trained twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import redis
from celery import shared_task

from ml.versions import (
    IncompatibleModelError,
    VersionNotFoundError,
    find_version_by_job,
    load_model,
    save_version,
)
from worker.app import TASK_TRAIN
from worker.client import Keys, as_text
from worker.jobs import FINAL_JOB_STATES, TrainingRequest
from worker.registry import ActiveVersion, PointerError
from worker.settings import Settings, get_settings

if TYPE_CHECKING:
    from ml.dataset import Dataset
    from ml.progress import BatchReport, EpochReport

log = logging.getLogger(__name__)

CANCEL_CHECK_SECONDS = 0.5


class JobFailed(Exception):
    """A job cannot run as asked; the message is shown to the administrator."""


class ProgressWriter:
    """Writes a job's ``progress`` field: the last finished epoch, or where the running one is.

    After an epoch: the :class:`~ml.progress.EpochReport` (``epoch`` = the finished one). During
    one: the :class:`~ml.progress.BatchReport` (``epoch`` = the running one, with ``batch`` and
    ``batches``) plus the metrics of the last finished epoch.
    """

    def __init__(self, redis_client: redis.Redis, job_key: str):
        self.redis = redis_client
        self.job_key = job_key
        self.metrics: dict[str, float] = {}

    def epoch_done(self, report: EpochReport) -> None:
        """Record a finished epoch."""
        self.metrics = report.metrics
        self._write(dataclasses.asdict(report))

    def batch_done(self, report: BatchReport) -> None:
        """Record progress inside the running epoch."""
        self._write({"metrics": self.metrics, **dataclasses.asdict(report)})

    def _write(self, doc: dict[str, Any]) -> None:
        self.redis.hset(self.job_key, "progress", json.dumps({"stage": "training", **doc}))


class TrainingRunner:
    """Runs fine-tuning jobs in one trainer process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.active = ActiveVersion(self.redis, self.keys, settings.model_dir)

    def run(self, job_id: str) -> None:
        """Run one job from its Redis hash to a final state."""
        key = self.keys.training_job(job_id)
        status, params, cancel = self.redis.hmget(key, ["status", "params", "cancel_requested"])
        if status is None or params is None:
            log.warning("training job %s is unknown or expired", job_id)
            return
        if as_text(status) in FINAL_JOB_STATES:
            return
        if cancel is not None and as_text(cancel) == "1":
            self._finish(job_id, "cancelled")
            return
        published = find_version_by_job(self.settings.model_dir, job_id)
        if published is not None:
            # Redelivered after an earlier delivery published (the trainer died before the ack).
            self._finish(job_id, "done", outcome={"version": published, "redelivered": True})
            return
        started = time.time()
        self.redis.hset(
            key,
            mapping={
                "status": "running",
                "started_at": started,
                "progress": json.dumps({"stage": "loading dataset"}),
            },
        )
        from ml.dataset import DatasetError
        from ml.progress import TrainingCancelled

        try:
            request = TrainingRequest.model_validate(json.loads(as_text(params)))
            outcome = self._train(job_id, request)
        except TrainingCancelled:
            log.info("training job %s cancelled", job_id)
            self._finish(job_id, "cancelled")
        except (
            JobFailed, DatasetError, IncompatibleModelError, VersionNotFoundError, PointerError,
            ValueError, OSError,
        ) as exc:  # fmt: skip
            log.warning("training job %s failed: %s", job_id, exc)
            self._finish(job_id, "failed", error=str(exc))
        except Exception as exc:
            log.exception("training job %s crashed", job_id)
            self._finish(job_id, "failed", error=f"{type(exc).__name__}: {exc}")
        else:
            self._finish(job_id, "done", outcome=outcome)

    def _train(self, job_id: str, request: TrainingRequest) -> dict[str, Any]:
        from ml.config import TrainConfig
        from ml.dataset import load_dataset
        from ml.layers import intensity_of
        from ml.progress import TrainingCancelled
        from ml.training import train

        base_model = None
        parent: int | None = None
        base_weights: str | None
        input_size = request.input_size
        intensity: str = request.intensity
        if request.base == "active":
            parent = self.active.get()
            if parent is None:
                raise JobFailed("base 'active' asked for, but no version is active")
            base_model = load_model(self.settings.model_dir, parent)
            # The architecture is the base's: its input size and its intensity layer.
            input_size = int(base_model.input_shape[1])
            intensity = intensity_of(base_model)
            base_weights = None
            base_label = f"version {parent}"
        elif request.base in ("imagenet", "none"):
            base_weights = None if request.base == "none" else "imagenet"
            base_label = request.base
        else:
            path = self.settings.data_dir / request.base
            if not path.is_file():
                raise JobFailed(f"weights file {request.base!r} not found in CXR_DATA_DIR")
            base_weights = os.fspath(path)
            base_label = request.base
        # The request's knobs are TrainConfig's own (ml.config declares both); only the base is
        # resolved here.
        knobs = request.knobs()
        config = TrainConfig.from_dict(
            knobs | {"input_size": input_size, "intensity": intensity, "base_weights": base_weights}
        )
        root = self.settings.data_dir / request.dataset
        if not root.is_dir():
            raise JobFailed(f"dataset {request.dataset!r} not found in CXR_DATA_DIR")
        dataset = load_dataset(root, config)
        should_stop = self._cancel_check(job_id)
        progress = ProgressWriter(self.redis, self.keys.training_job(job_id))
        result = train(
            config,
            dataset,
            base_model=base_model,
            on_epoch=progress.epoch_done,
            on_batch=progress.batch_done,
            should_stop=should_stop,
            precision=self.settings.precision,
        )
        if should_stop(force=True):
            raise TrainingCancelled()
        metadata = save_version(
            result.model,
            self.settings.model_dir,
            class_names=dataset.class_names,
            base_weights=base_label,
            parent_version=parent,
            hyperparameters={
                **config.to_dict(),
                "promotion": request.promotion,
                "precision": result.precision,
            },
            dataset={**dataset.fingerprint, "path": request.dataset, "skipped": dataset.skipped},
            training_seconds=round(result.seconds, 1),
            evaluation=result.evaluation,
            curves_png=result.curves_png,
            job_id=job_id,
            decision_threshold=result.decision_threshold,
            ood_gate=result.ood_gate,
            ood=result.ood,
            trained=True,
        )
        self._set_stage(job_id, "external evaluation")
        external = self._evaluate_external(metadata.version)
        promotion = self._promote(
            job_id, request.promotion or "if_better", metadata.version, result.evaluation,
            dataset, root,
        )  # fmt: skip
        promotion = self._gate_external(promotion, external, request)
        if promotion["promoted"]:
            self.active.set(
                metadata.version, actor=f"training job {job_id}", reason=promotion["reason"]
            )
        return {
            "version": metadata.version,
            "metrics": metadata.metrics,
            "training_seconds": metadata.training_seconds,
            "skipped_files": len(dataset.skipped),
            "promotion": promotion,
            "external": {name: _brief(doc) for name, doc in external.items()},
        }

    def _set_stage(self, job_id: str, stage: str) -> None:
        self.redis.hset(self.keys.training_job(job_id), "progress", json.dumps({"stage": stage}))

    def _evaluate_external(self, version: int) -> dict[str, dict[str, Any]]:
        """Score ``version`` on every registered evaluation set and store the results."""
        from ml.external import evaluate_on_sets
        from worker.evalsets import EvalDatasets

        return evaluate_on_sets(
            self.settings.model_dir, version, EvalDatasets(self.settings, self.redis).resolved()
        )

    def _gate_external(
        self, decision: dict[str, Any], external: dict[str, Any], request: TrainingRequest
    ) -> dict[str, Any]:
        """The external gate on an ``if_better`` promotion: no set may fall behind the active."""
        from ml.external import evaluate_on_sets, read_external
        from ml.promotion import apply_external_gate, external_gate
        from worker.evalsets import EvalDatasets

        active = decision.get("active_version")
        if not (decision["promoted"] and decision["policy"] == "if_better" and active):
            return decision
        tolerance = request.external_tolerance
        if tolerance is None:
            tolerance = self.settings.promotion_external_tolerance
        sets = EvalDatasets(self.settings, self.redis).resolved()
        stored = read_external(self.settings.model_dir, active)
        # A set registered after the active version was published: score it there now.
        missing = {name: path for name, path in sets.items() if name not in stored}
        stored |= evaluate_on_sets(self.settings.model_dir, active, missing)
        gate = external_gate(external, stored, active, tolerance)
        return apply_external_gate(decision, gate)

    def _promote(
        self,
        job_id: str,
        policy: str,
        version: int,
        evaluation: dict[str, Any],
        dataset: Dataset,
        root: os.PathLike[str],
    ) -> dict[str, Any]:
        """The promotion rule's decision for the new version (the caller moves the pointer)."""
        from ml.promotion import decide, needs_active_score, score_version

        active = self.active.get()
        scores = None
        if active is not None and needs_active_score(policy, active):
            scores = score_version(self.settings.model_dir, active, dataset, root)
        return decide(policy, self.settings.promotion_metric, evaluation, active, scores)

    def _cancel_check(self, job_id: str) -> Any:
        key = self.keys.training_job(job_id)
        last = 0.0
        requested = False

        def should_stop(force: bool = False) -> bool:
            # Called after every batch: ask Redis at most every CANCEL_CHECK_SECONDS.
            nonlocal last, requested
            now = time.monotonic()
            if not requested and (force or now - last >= CANCEL_CHECK_SECONDS):
                last = now
                flag = self.redis.hget(key, "cancel_requested")
                requested = flag is not None and as_text(flag) == "1"
            return requested

        return should_stop

    def _finish(
        self,
        job_id: str,
        status: str,
        *,
        outcome: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        fields: dict[str, str | float] = {"status": status, "finished_at": time.time()}
        if outcome is not None:
            fields["outcome"] = json.dumps(outcome)
        if error is not None:
            fields["error"] = error
        self.redis.hset(self.keys.training_job(job_id), mapping=fields)  # type: ignore[arg-type]


def _brief(doc: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of an external evaluation, for a job's outcome."""
    keys = ("n", "accuracy", "sensitivity", "sensitivity_ci", "specificity", "roc_auc", "error")
    return {k: doc[k] for k in keys if k in doc}


_runner: TrainingRunner | None = None


def get_runner() -> TrainingRunner:
    """This process's runner (created on first use, after the fork)."""
    global _runner
    if _runner is None:
        _runner = TrainingRunner(get_settings())
    return _runner


@shared_task(name=TASK_TRAIN)
def train_model(job_id: str) -> None:
    """Run fine-tuning job ``job_id``; its state and outcome go to the job's Redis hash."""
    get_runner().run(job_id)
