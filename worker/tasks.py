"""Celery tasks: thin wrappers that hand over to the process's :class:`WorkerRuntime`."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import shared_task
from celery.signals import (
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from worker import metrics
from worker.app import TASK_PREDICT
from worker.runtime import get_runtime, stop_runtime
from worker.settings import get_settings

log = logging.getLogger(__name__)


@worker_process_init.connect
def _start_in_child(**_: Any) -> None:
    # After the fork, never before: a TensorFlow model built in the parent hangs in the child.
    get_runtime()


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    # The threads (or solo) pool runs tasks in this very process: load the model now instead of
    # on the first task. A prefork parent must not (see above); its children did already.
    pool = getattr(sender, "pool", None)
    if pool is not None and "prefork" not in type(pool).__module__:
        get_runtime()
    settings = get_settings()
    try:
        metrics.serve(settings.worker_metrics_port, settings.worker_metrics_addr)
    except OSError as exc:  # a taken port must not stop the worker from serving predictions
        log.error("metrics endpoint on port %s not started: %s", settings.worker_metrics_port, exc)


@worker_process_shutdown.connect
def _forget_child(pid: int | None = None, **_: Any) -> None:
    metrics.process_exited(pid or os.getpid())


@worker_process_shutdown.connect
@worker_shutdown.connect
def _stop(**_: Any) -> None:
    stop_runtime()


@shared_task(name=TASK_PREDICT)
def predict(job_id: str) -> None:
    """Classify the upload of job ``job_id``; the result goes to the job's Redis hash."""
    get_runtime().process(job_id)
