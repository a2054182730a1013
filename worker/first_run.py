"""The first run: the trainer fine-tunes a first model by itself when the registry is empty.

On ``worker_ready`` (``worker.trainer_app``) the trainer's main process calls
:func:`on_trainer_ready`: if ``CXR_FIRST_RUN`` is on, ``MODEL_DIR`` holds no version, no earlier
first-run job is queued, running or done, and a dataset is found (``CXR_FIRST_RUN_DATASET``, else
``CXR_DATA_DIR`` itself or its first subfolder holding ``train/``), it submits an ordinary
fine-tuning job (``worker.jobs``) with actor ``first-run``; its promotion policy ``if_better``
makes it active while no version is. A Redis ``SET NX`` lock with an expiry makes sure two
trainers starting together never both submit one. What was decided is kept in the hash
``<prefix>:first-run`` (state, job id, reason), which the home page reads (``web.first_run``).

TF-free: it runs in the trainer's main process, which must not import TensorFlow before its pool
forks.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import redis
from celery import Celery
from pydantic import ValidationError

from ml.versions import list_versions
from worker.client import Keys, as_text
from worker.jobs import FINAL_JOB_STATES, TrainingJobs, TrainingRequest
from worker.settings import Settings

log = logging.getLogger(__name__)

ACTOR = "first-run"
LOCK_SECONDS = 60
"""The lock outlives any decision (a few Redis calls and a folder listing) by far."""

IMAGENET_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"

# With ImageNet weights the recipe's own defaults (ml.config.TrainingOptions) fine-tune well.
# From random weights the head alone learns nothing: the whole VGG16 is trained at 128 px, the
# recipe measured in docs/training-run.md (21 min on 2 CPU cores for the 1,537-image set in
# float32, 7-12 min in bfloat16 on AMX), with histogram equalisation inside the model, the arm
# of the ablation in docs/external-validation.md that held up best on another split.
IMAGENET_DEFAULTS: dict[str, Any] = {"base": "imagenet"}
SCRATCH_DEFAULTS: dict[str, Any] = {
    "base": "none", "input_size": 128, "epochs_head": 0, "finetune_blocks": 5,
    "epochs_finetune": 12, "learning_rate_finetune": 1e-4, "patience": 4,
    "intensity": "equalize",
}  # fmt: skip

State = Literal["disabled", "not_needed", "no_dataset", "started", "error"]


@dataclass(frozen=True)
class FirstRunRecord:
    """What the last trainer start decided about the first run (the ``first-run`` hash)."""

    state: State
    reason: str
    at: float
    job_id: str | None = None
    dataset: str | None = None
    trainer: str | None = None

    def to_mapping(self) -> dict[str, str | float]:
        """The hash's fields (unset ones left out)."""
        fields: dict[str, str | float] = {"state": self.state, "reason": self.reason, "at": self.at}
        for name in ("job_id", "dataset", "trainer"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        return fields

    def to_dict(self) -> dict[str, Any]:
        """JSON-native form (``/readyz``'s ``first_run``)."""
        return {
            "state": self.state,
            "reason": self.reason,
            "at": self.at,
            "job_id": self.job_id,
            "dataset": self.dataset,
        }


def read_record(redis_client: redis.Redis, keys: Keys) -> FirstRunRecord | None:
    """The stored first-run record, or ``None`` when no trainer has decided yet."""
    raw = redis_client.hgetall(keys.first_run())
    if not raw:
        return None
    doc = {as_text(k): as_text(v) for k, v in raw.items()}
    return FirstRunRecord(
        state=doc.get("state", "error"),  # type: ignore[arg-type]
        reason=doc.get("reason", ""),
        at=float(doc.get("at", 0.0)),
        job_id=doc.get("job_id"),
        dataset=doc.get("dataset"),
        trainer=doc.get("trainer"),
    )


def find_dataset(settings: Settings) -> str | None:
    """The first run's dataset as a path inside ``CXR_DATA_DIR``, or ``None`` when there is none.

    ``CXR_FIRST_RUN_DATASET`` when set (and present), else ``CXR_DATA_DIR`` itself when it holds
    ``train/``, else its first subfolder by name that does (the Kaggle archive unpacks into
    ``chest_xray/``).
    """
    root = settings.data_dir
    if settings.first_run_dataset:
        named = settings.first_run_dataset
        return named if (root / named / "train").is_dir() else None
    if (root / "train").is_dir():
        return "."
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return None
    for child in children:
        if (child / "train").is_dir():
            return child.name
    return None


def imagenet_weights_cached() -> bool:
    """Whether Keras finds the VGG16 notop ImageNet weights without a download.

    Keras keeps downloads in ``$KERAS_HOME/models`` (``~/.keras`` when unset, ``/tmp/.keras``
    when that is not writable); the Docker worker image fetches them at build time into
    ``KERAS_HOME=/opt/keras``. ``KERAS_HOME`` is Keras's own variable, not a cxr setting.
    """
    homes = [os.environ.get("KERAS_HOME"), os.path.expanduser("~/.keras"), "/tmp/.keras"]
    return any(h and (Path(h) / "models" / IMAGENET_NOTOP_FILE).is_file() for h in homes)


def default_options(imagenet: bool) -> dict[str, Any]:
    """The first run's training options before ``CXR_FIRST_RUN_OPTIONS`` is applied."""
    return dict(IMAGENET_DEFAULTS if imagenet else SCRATCH_DEFAULTS)


@dataclass(frozen=True)
class Decision:
    """Whether to start a first run, and the record to keep (``record`` None: keep the old one)."""

    start: bool
    record: FirstRunRecord | None
    dataset: str | None = None


def decide(
    settings: Settings,
    versions: list[int],
    previous: FirstRunRecord | None,
    previous_job_status: str | None,
    dataset: str | None,
    now: float,
) -> Decision:
    """The first-run rule (pure): start one only into an empty registry, and only once.

    Args:
        settings: ``first_run`` and ``data_dir`` are read.
        versions: The versions in ``MODEL_DIR``.
        previous: The stored record of an earlier trainer start.
        previous_job_status: The status of that record's job, ``None`` when it has none or the
            job is gone.
        dataset: What :func:`find_dataset` found.
        now: The time recorded.
    """
    if not settings.first_run:
        return Decision(False, FirstRunRecord("disabled", "CXR_FIRST_RUN is off", now))
    # A first-run job queued, running (a trainer restarted mid-run gets it redelivered), or done
    # (its record is kept for the home page and /readyz): never a second one. A failed or
    # cancelled one, or one whose job record is gone, is tried again.
    under_way = previous_job_status is not None and (
        previous_job_status not in FINAL_JOB_STATES or previous_job_status == "done"
    )
    if previous is not None and previous.state == "started" and under_way:
        return Decision(False, None)
    if versions:
        why = f"the registry holds {len(versions)} version(s) (latest {versions[-1]})"
        return Decision(False, FirstRunRecord("not_needed", why, now))
    if dataset is None:
        where = settings.data_dir
        named = settings.first_run_dataset
        what = f"CXR_FIRST_RUN_DATASET {named!r} (no train/ in it)" if named else "no dataset"
        why = (
            f"{what} in {where}: put one there in the layout train/<CLASS>/, test/<CLASS>/ "
            "(compose: ./data) and restart the trainer"
        )
        return Decision(False, FirstRunRecord("no_dataset", why, now))
    return Decision(True, None, dataset)


def build_request(settings: Settings, dataset: str, imagenet: bool) -> TrainingRequest:
    """The first run's job: the defaults, ``CXR_FIRST_RUN_OPTIONS`` over them, the dataset.

    Raises:
        ValidationError: ``CXR_FIRST_RUN_OPTIONS`` holds an unknown or invalid option.
    """
    fields = default_options(imagenet) | {"promotion": "if_better"}
    fields |= settings.first_run_options | {"dataset": dataset}
    return TrainingRequest.model_validate(fields)


class FirstRun:
    """Takes the lock, decides and, if so, submits the first run; keeps the record."""

    def __init__(self, settings: Settings, redis_client: redis.Redis, celery: Celery, trainer: str):
        self.settings = settings
        self.redis = redis_client
        self.keys = Keys(settings.key_prefix)
        self.jobs = TrainingJobs(settings, redis_client, celery)
        self.trainer = trainer

    def check(self) -> FirstRunRecord | None:
        """Decide once; return the record now stored (``None``: none was ever stored)."""
        lock = self.keys.first_run_lock()
        if not self.redis.set(lock, self.trainer, nx=True, ex=LOCK_SECONDS):
            log.info("first run: another trainer is deciding it")
            return read_record(self.redis, self.keys)
        try:
            previous = read_record(self.redis, self.keys)
            job = self.jobs.get(previous.job_id) if previous and previous.job_id else None
            dataset = find_dataset(self.settings) if self.settings.first_run else None
            decision = decide(
                self.settings,
                list_versions(self.settings.model_dir),
                previous,
                job["status"] if job else None,
                dataset,
                time.time(),
            )
            record = decision.record
            if decision.start and decision.dataset is not None:
                record = self._start(decision.dataset)
            if record is None:
                log.info("first run: job %s is already under way", previous and previous.job_id)
                return previous
            self.redis.delete(self.keys.first_run())
            self.redis.hset(self.keys.first_run(), mapping=record.to_mapping())  # type: ignore[arg-type]
            log.info("first run: %s (%s)", record.state, record.reason)
            return record
        finally:
            # Only our own lock: one that expired and was taken by another trainer stays.
            if self.redis.get(lock) == self.trainer.encode():
                self.redis.delete(lock)

    def _start(self, dataset: str) -> FirstRunRecord:
        now = time.time()
        imagenet = imagenet_weights_cached()
        try:
            request = build_request(self.settings, dataset, imagenet)
        except ValidationError as exc:
            why = f"CXR_FIRST_RUN_OPTIONS is invalid: {_one_line(exc)}"
            return FirstRunRecord("error", why, now, dataset=dataset, trainer=self.trainer)
        try:
            job_id = self.jobs.submit(request, ACTOR)
        except Exception as exc:  # the broker refused the message: say so on the home page
            why = f"the first-run job could not be queued: {exc}"
            return FirstRunRecord("error", why, now, dataset=dataset, trainer=self.trainer)
        base = "ImageNet weights" if request.base == "imagenet" else f"base {request.base!r}"
        why = f"the registry is empty: fine-tuning a first model on {dataset!r} from {base}"
        return FirstRunRecord(
            "started", why, now, job_id=job_id, dataset=dataset, trainer=self.trainer
        )


def _one_line(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def on_trainer_ready(sender: Any = None, **_: Any) -> None:
    """``worker_ready`` handler of the trainer: check the first run, never fail the worker."""
    from worker.app import create_celery
    from worker.settings import get_settings

    settings = get_settings()
    name = f"{getattr(sender, 'hostname', None) or socket.gethostname()}:{os.getpid()}"
    try:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
        FirstRun(settings, client, create_celery(settings), name).check()
    except Exception:
        # The trainer still serves jobs submitted by hand; the record keeps the last decision.
        log.exception("first run: the check failed")
