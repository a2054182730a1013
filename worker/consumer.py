"""The workers' broker consumer: Celery's, reconnecting at a bounded interval after an outage."""

from __future__ import annotations

from functools import partial
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu import Connection

# kombu's names for the retry intervals of a connection (Connection.ensure_connection); they are
# read from broker_transport_options.
RETRY_OPTIONS = ("interval_start", "interval_step", "interval_max")


class Consumer(CeleryConsumer):
    """Celery's consumer, but its broker (re)connection honours the retry intervals of
    ``broker_transport_options`` (``interval_start``, ``interval_step``, ``interval_max``).

    Celery calls ``Connection.ensure_connection`` with kombu's defaults (2 s, +2 s per attempt, up
    to 30 s) and no way to configure them: after a 15 s Redis outage the worker was sleeping 8 s
    when Redis came back, and the first prediction waited 4 s in the queue.
    """

    def ensure_connected(self, conn: Connection) -> Connection:
        """Connect ``conn`` as Celery does, retrying at the configured intervals."""
        options: dict[str, Any] = self.app.conf.broker_transport_options or {}
        bounds = {name: options[name] for name in RETRY_OPTIONS if name in options}
        if bounds:
            # Celery passes (errback, max_retries, callback=...): the intervals are ours alone.
            conn.ensure_connection = partial(conn.ensure_connection, **bounds)  # type: ignore[method-assign]
        return super().ensure_connected(conn)
