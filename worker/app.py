"""The Celery application factory: one place for broker, queues and delivery guarantees."""

from __future__ import annotations

from typing import Any, Literal

from celery import Celery
from kombu import Queue

from worker.settings import Settings, get_settings

TASK_PREDICT = "cxr.predict"
TASK_TRAIN = "cxr.train"

Role = Literal["inference", "trainer", "client"]


def unacked_mutex_expire(settings: Settings) -> int:
    """Seconds kombu's restore lock lives: the longest a dead scanner delays redelivery."""
    return max(5, 2 * settings.restore_interval_seconds)


def create_celery(settings: Settings | None = None, role: Role = "client") -> Celery:
    """Return a Celery app configured from ``settings`` (the environment by default).

    ``client`` (the web process) only sends tasks; ``inference`` and ``trainer`` are the two kinds
    of worker, each importing only its own tasks and with its own redelivery timing.
    """
    settings = settings or get_settings()
    include = {"inference": ["worker.tasks"], "trainer": ["worker.training"], "client": []}[role]
    app = Celery("cxr", broker=settings.redis_url, include=include)
    # kombu's restore scan hands back every message in its unacked set that is older than *its
    # own* visibility timeout: a trainer's set of its own keeps inference workers (60 s) from
    # redelivering a training run that is still going. kombu's default names ("unacked", ...) are
    # global to the Redis database; under the key prefix, two deployments never share them.
    unacked = f"{settings.key_prefix}:{'training' if role == 'trainer' else 'inference'}:unacked"
    transport: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout_seconds,
        # kombu scans for unacknowledged tasks every interval * throttle seconds (10 * 10 by
        # default); throttle 1 makes the interval the whole delay.
        "unacked_restore_interval": settings.restore_interval_seconds,
        "unacked_restore_throttle": 1,
        "unacked_key": unacked,
        "unacked_index_key": f"{unacked}_index",
        "unacked_mutex_key": f"{unacked}_mutex",
        # The scan runs under a lock that a worker killed mid-scan never releases: with kombu's
        # 300 s expiry no task of any crashed worker came back for five minutes. The lock only
        # keeps workers from scanning at once (each restore is a WATCHed transaction), so a
        # short expiry is safe.
        "unacked_mutex_expire": unacked_mutex_expire(settings),
        # Broker reconnection: retry at once, then every 0.25 s, never more than 0.5 s apart, so
        # predictions flow again within a second of Redis coming back (kombu's default backoff,
        # 2 s growing by 2 s per attempt, had reached 8 s after a 15 s outage). A refused
        # connection costs Redis and the worker next to nothing. The workers' consumer
        # (worker.consumer) and kombu's own reconnection of the publishing connection (web,
        # bounded in total by broker_connection_timeout) both read these.
        "interval_start": 0,
        "interval_step": 0.25,
        "interval_max": 0.5,
    }
    extra: dict[str, Any] = {}
    if role == "trainer":
        transport["visibility_timeout"] = settings.training_visibility_timeout_seconds
        # A run must end before its message would be redelivered to another trainer.
        extra["task_time_limit"] = max(60, settings.training_visibility_timeout_seconds - 60)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        # Results live in cxr's own Redis keys (worker.client, worker.jobs): Celery stores none.
        task_ignore_result=True,
        task_queues=(Queue(settings.inference_queue), Queue(settings.training_queue)),
        task_default_queue=settings.inference_queue,
        task_create_missing_queues=False,
        task_routes={
            TASK_PREDICT: {"queue": settings.inference_queue},
            TASK_TRAIN: {"queue": settings.training_queue},
        },
        # At-least-once: acknowledge after the task ran, and hand the task back if the process
        # running it dies. Each process reserves one task beyond the one it runs.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        # Retry forever: at 0.5 s apart, Celery's 100 retries would end a worker after a ~50 s
        # outage, and a worker can do nothing but wait for Redis anyway.
        broker_connection_max_retries=None,
        worker_consumer="worker.consumer:Consumer",
        # Celery 6's default, set explicitly (Celery warned on every connection loss while it was
        # unset). On connection loss a running task that is not acknowledged yet (acks_late) is
        # cancelled instead of finishing on a connection that is gone. Delivery stays
        # at-least-once: Celery leaves a cancelled task's message unacknowledged, so it stays in
        # the unacked set in Redis (reject_on_worker_lost requeues one whose process died), and
        # the restore scan hands it out again once it is older than the visibility timeout: 60 s
        # for a prediction (one already stored is not run twice, worker.runtime), the training
        # visibility timeout for a fine-tuning run (a 3 s outage mid-run left the job "running"
        # either way; with the old default the run went on and failed writing to Redis). The
        # threads pool cannot cancel a prediction: Celery logs that and the prediction finishes.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # One fine-tuning run at a time: it uses every core and most of the memory.
        worker_concurrency=1 if role == "trainer" else settings.worker_concurrency,
        worker_send_task_events=False,
        task_send_sent_event=False,
        **extra,
    )
    return app
