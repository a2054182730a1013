"""The workers' broker consumer: Celery's, reconnecting at a bounded interval after an outage and
surviving the teardown of the connection Redis dropped."""

from __future__ import annotations

from functools import partial
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu import Connection
from kombu.transport import redis as kombu_redis

# kombu's names for the retry intervals of a connection (Connection.ensure_connection); they are
# read from broker_transport_options.
RETRY_OPTIONS = ("interval_start", "interval_step", "interval_max")


class RedisChannel(kombu_redis.Channel):
    """kombu's Redis channel, whose ``close()`` finishes even when Redis dropped a pending BRPOP.

    Workaround for kombu 5.7.0 with Celery 5.7.0 (no upstream issue found). A worker exited on a
    Redis restart under load with ``Unrecoverable error: AttributeError("'NoneType' object has no
    attribute 'hostname'")``:

    1. ``Channel.close()`` (kombu/transport/redis.py:1890) first reads the reply of the BRPOP the
       channel is waiting on. With the connection gone that read raises a connection error and
       ``close()`` stops there: the channel stays open, its unacknowledged messages unrestored.
    2. Celery's ``Consumer.on_connection_error_after_connected``
       (celery/worker/consumer/consumer.py:476-487) collects the lost connection, which detaches
       its transport (``transport.client = None``, kombu/connection.py:429), then closes it again
       (older Celery releases only collected it).
    3. The second ``close()`` restores the unacknowledged messages (kombu/transport/virtual/
       base.py:806) through a new Redis pool built from the detached transport
       (``_connparams``, kombu/transport/redis.py:1959 reads ``transport.client.hostname``). The
       AttributeError is no connection error: Celery stops the worker.

    It takes a BRPOP in flight and a task delivered but not yet acknowledged (acks_late) when
    Redis goes away, i.e. a worker under load. Here a close stopped by a connection error goes on
    once, while the transport is still attached: the BRPOP is over by then (kombu clears it even
    when its read fails), so the rest of the teardown runs, as it does when the BRPOP's own read
    is what noticed the outage. Its messages stay in Redis's unacked set and are delivered again
    after the visibility timeout (a prediction already stored is not run twice, worker.runtime).
    """

    def close(self) -> None:
        try:
            super().close()
        except self.connection_errors:
            if self.closed:
                raise
            super().close()


class Consumer(CeleryConsumer):
    """Celery's consumer, but its broker (re)connection honours the retry intervals of
    ``broker_transport_options`` (``interval_start``, ``interval_step``, ``interval_max``), and
    its Redis channels close cleanly after Redis went away (:class:`RedisChannel`).

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
        # Every consuming connection passes here (the first and each reconnection) before it
        # opens a channel. Only kombu's plain Redis transport: Sentinel has channels of its own.
        transport = conn.transport
        if transport.Channel is kombu_redis.Channel:
            transport.Channel = RedisChannel
        return super().ensure_connected(conn)
