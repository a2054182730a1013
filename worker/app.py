"""The Celery application factory: one place for broker, queues and delivery guarantees."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from worker.settings import Settings, get_settings

TASK_PREDICT = "cxr.predict"


def create_celery(settings: Settings | None = None) -> Celery:
    """Return a Celery app configured from ``settings`` (the environment by default).

    The web process builds its own instance to send tasks; only a worker imports the tasks.
    """
    settings = settings or get_settings()
    app = Celery("cxr", broker=settings.redis_url, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        # Results live in cxr's own Redis keys (worker.client), so Celery stores none.
        task_ignore_result=True,
        task_queues=(Queue(settings.inference_queue),),
        task_default_queue=settings.inference_queue,
        task_create_missing_queues=False,
        task_routes={TASK_PREDICT: {"queue": settings.inference_queue}},
        # At-least-once: acknowledge after the task ran, and hand the task back if the process
        # running it dies. Each process reserves one task beyond the one it runs.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_seconds,
            # kombu scans for unacknowledged tasks every interval * throttle seconds (10 * 10 by
            # default); throttle 1 makes the interval the whole delay.
            "unacked_restore_interval": settings.restore_interval_seconds,
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        worker_concurrency=settings.worker_concurrency,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app
