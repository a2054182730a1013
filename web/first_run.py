"""What the home page and ``/readyz`` say about the first run (``worker.first_run``).

TF-free: reads the ``first-run`` record the trainer wrote and its job's progress from Redis, and
turns them into what ``templates/_first_run.html`` shows while no model is served.
"""

from __future__ import annotations

from typing import Any

import redis

from web import extension, prediction_client
from worker.first_run import read_record
from worker.jobs import TrainingJobs
from worker.registry import ActiveVersion


def first_run_status() -> dict[str, Any] | None:
    """The first-run record with its job's status and progress, or ``None`` if none was written.

    Raises:
        redis.RedisError: Redis is unreachable.
    """
    client = prediction_client()
    record = read_record(client.redis, client.keys)
    if record is None:
        return None
    doc = record.to_dict()
    job = extension("cxr_jobs", TrainingJobs).get(record.job_id) if record.job_id else None
    doc["job_status"] = job["status"] if job else None
    doc["progress"] = job.get("progress") if job else None
    doc["outcome"] = job.get("outcome") if job else None
    doc["error"] = job.get("error") if job else None
    return doc


def no_model_served() -> bool:
    """Every live worker says it has nothing to serve; with none alive, no version is active.

    Raises:
        redis.RedisError: Redis is unreachable.
    """
    workers = prediction_client().workers()
    if workers:  # what the workers serve decides, whatever the pointer says
        return all(w.state in ("no_model", "error") for w in workers)
    return extension("cxr_registry", ActiveVersion).get() is None


def panel() -> dict[str, Any] | None:
    """What the home page shows about getting a first model; ``None`` while a model is served.

    ``kind`` is ``training`` (a first run is queued or running: phase, epoch, ETA), ``loading``
    (it finished: workers are loading its version) or ``none`` (no first run under way: the page
    explains the two ways to a model, with the trainer's reason when it gave one).
    """
    try:
        if not no_model_served():
            return None
        status = first_run_status()
    except redis.RedisError:
        return None  # the page still renders; uploads say that Redis is away
    job_status = status["job_status"] if status else None
    if status and job_status in ("queued", "running"):
        return {"kind": "training", "dataset": status["dataset"], **progress_view(status)}
    if status and job_status == "done":
        version = (status.get("outcome") or {}).get("version")
        return {"kind": "loading", "dataset": status["dataset"], "version": version}
    reason = None
    if status and job_status in ("failed", "cancelled"):
        error = status.get("error") or "no reason given"
        reason = f"The first run's fine-tuning job {job_status}: {error}."
    elif status and status["state"] in ("no_dataset", "error", "disabled"):
        reason = f"The trainer did not start a first run: {status['reason']}."
    return {"kind": "none", "reason": reason}


def progress_view(status: dict[str, Any]) -> dict[str, Any]:
    """A running job's progress as the panel shows it: a stage line, a fraction and an ETA."""
    progress = status.get("progress") or {}
    if status["job_status"] == "queued":
        stage = "Queued: the trainer starts it in a moment."
        return {"stage": stage, "fraction": None, "eta": None}
    if progress.get("stage") != "training":
        stage = str(progress.get("stage") or "starting").capitalize()
        return {"stage": f"{stage}…", "fraction": None, "eta": None}
    total = int(progress.get("total_epochs") or 0)
    epoch = int(progress.get("epoch") or 0)
    parts = [f"phase {progress.get('phase', '?')} of 2", f"epoch {epoch} of {total or '?'}"]
    done_epochs = float(epoch)
    if progress.get("batches"):
        batch, batches = int(progress.get("batch") or 0), int(progress["batches"])
        parts.append(f"batch {batch} of {batches}")
        done_epochs = epoch - 1 + batch / batches  # the epoch named is the running one
    fraction = min(1.0, max(0.0, done_epochs / total)) if total else None
    return {
        "stage": "Training: " + ", ".join(parts),
        "fraction": fraction,
        "eta": format_eta(progress.get("eta_seconds")),
    }


def format_eta(seconds: object) -> str | None:
    """``about 12 min left``, ``about 40 s left``; ``None`` when unknown."""
    if not isinstance(seconds, int | float) or seconds < 0:
        return None
    if seconds < 90:
        return f"about {round(seconds)} s left"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min left"
    return f"about {seconds / 3600:.1f} h left"
