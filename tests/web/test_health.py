"""Liveness and readiness endpoints, against a real Redis (and one that is not there)."""

from __future__ import annotations

import time

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from tests.web.conftest import heartbeat
from worker.client import Keys
from worker.settings import Settings


def test_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_without_workers(client: FlaskClient) -> None:
    # An upload now would wait in the queue: not ready, though Redis is fine.
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json() == {
        "status": "unavailable",
        "reason": "no live worker process",
        "redis": "ok",
        "serving": False,
        "model_versions": [],
        "workers": [],
        "first_run": None,  # no trainer has started yet
    }


def test_readyz_with_a_serving_worker(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, "serving", 1)
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ready"
    assert "reason" not in body
    assert body["serving"] is True
    assert body["model_versions"] == [1]
    assert body["workers"] == [
        {
            "name": "fake:1",
            "state": "serving",
            "model_version": 1,
            "precision": None,
            "hardware": None,
            "error": None,
        }
    ]


def test_readyz_with_a_worker_without_model(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, "no_model", None)
    response = client.get("/readyz")
    # Redis is fine, but an upload would be refused (503 no_model): not ready.
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable"
    assert body["reason"] == "no live worker process serves a model"
    assert body["redis"] == "ok"
    assert body["serving"] is False
    assert body["model_versions"] == []
    assert [w["state"] for w in body["workers"]] == ["no_model"]


@pytest.mark.parametrize("states", [["loading"], ["error"], ["loading", "no_model", "error"]])
def test_readyz_is_503_until_a_worker_serves(
    states: list[str], client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    for i, state in enumerate(states):
        heartbeat(redis_client, settings, state, None, name=f"w:{i}")
    assert client.get("/readyz").status_code == 503
    # One serving process among them is enough: that one would classify the upload.
    heartbeat(redis_client, settings, "serving", 3, name="w:serving")
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ready"
    assert body["model_versions"] == [3]
    assert len(body["workers"]) == len(states) + 1


def test_readyz_forgets_expired_heartbeats(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    """A worker that stopped reporting is not live: readiness follows within its heartbeat TTL."""
    heartbeat(redis_client, settings, "serving", 1)
    assert client.get("/readyz").status_code == 200
    keys = Keys(settings.key_prefix)
    # As if the heartbeat had expired: gone from the index and the key.
    redis_client.zadd(keys.workers(), {keys.worker("fake:1"): time.time() - 1})
    redis_client.delete(keys.worker("fake:1"))
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["reason"] == "no live worker process"


def test_readyz_lists_every_worker_and_version(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, "serving", 2, name="b:1")
    heartbeat(redis_client, settings, "serving", 1, name="a:1")
    heartbeat(redis_client, settings, "serving", 2, name="a:2")
    body = client.get("/readyz").get_json()
    assert body["model_versions"] == [1, 2]
    assert [w["name"] for w in body["workers"]] == ["a:1", "a:2", "b:1"]


def test_readyz_ignores_other_prefixes(
    client: FlaskClient, redis_client: redis.Redis, settings: Settings
) -> None:
    other = settings.model_copy(update={"key_prefix": settings.key_prefix + "-other"})
    heartbeat(redis_client, other, "serving", 1)
    assert client.get("/readyz").get_json()["workers"] == []


def test_redis_unreachable(down_app: Flask) -> None:
    client = down_app.test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 503
    body = ready.get_json()
    assert body["status"] == "unavailable"
    assert body["reason"] == "Redis is unreachable"
    assert body["redis"].startswith("unreachable")
    # Liveness does not depend on Redis.
    alive = client.get("/healthz")
    assert alive.status_code == 200
    assert alive.get_json() == {"status": "ok"}
