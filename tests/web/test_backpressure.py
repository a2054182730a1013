"""Backpressure: a bounded queue (503 + Retry-After) and per-client rate limits (429)."""

from __future__ import annotations

import io
from pathlib import Path

import redis
from flask import Flask
from werkzeug.test import TestResponse

from tests.conftest import make_settings
from tests.web.conftest import heartbeat, png, queue_length
from worker.settings import Settings


def app_with(redis_url: str, tmp_path: Path, **overrides: object) -> tuple[Flask, Settings]:
    """An app on isolated settings with ``overrides``."""
    from web import create_app

    settings = make_settings(redis_url, tmp_path / "models", **overrides)
    return create_app({"TESTING": True, "CXR_SETTINGS": settings}), settings


def upload(app: Flask, addr: str = "127.0.0.1", path: str = "/api/v1/predictions") -> TestResponse:
    """POST one small PNG from client address ``addr``."""
    field = "file" if path.startswith("/api/") else "files"
    return app.test_client().post(
        path,
        data={field: (io.BytesIO(png()), "x.png")},
        content_type="multipart/form-data",
        environ_overrides={"REMOTE_ADDR": addr},
    )


def test_a_full_queue_is_answered_503_with_retry_after(
    redis_url: str, tmp_path: Path, redis_client: redis.Redis
) -> None:
    app, settings = app_with(redis_url, tmp_path, max_queued_predictions=3)
    heartbeat(redis_client, settings, "serving", 1)
    for _ in range(3):
        assert upload(app).status_code == 202
    refused = upload(app)
    assert refused.status_code == 503, refused.get_data(as_text=True)
    assert refused.get_json()["error"] == "queue_full"
    assert refused.headers["Retry-After"] == str(settings.queue_full_retry_after_seconds)
    assert queue_length(redis_client, settings) == 3  # nothing more was stored or queued
    page = upload(app, path="/")
    assert page.status_code == 503 and page.headers["Retry-After"]
    assert "try again in" in page.get_data(as_text=True)


def test_uploads_are_rate_limited_per_client(redis_url: str, tmp_path: Path) -> None:
    app, _ = app_with(redis_url, tmp_path, rate_limit_uploads="3/minute")
    assert [upload(app).status_code for _ in range(3)] == [202, 202, 202]
    limited = upload(app)
    assert limited.status_code == 429
    assert limited.is_json and limited.get_json()["error"] == "too_many_requests"
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    # The form counts against the same client's upload limit; other clients are not affected.
    assert upload(app, path="/").status_code == 429
    assert upload(app, addr="127.0.0.2").status_code == 202
    # Health stays open to a limited client.
    healthz = app.test_client().get("/healthz", environ_overrides={"REMOTE_ADDR": "127.0.0.1"})
    assert healthz.status_code == 200


def test_status_polls_have_their_own_limit(redis_url: str, tmp_path: Path) -> None:
    app, _ = app_with(redis_url, tmp_path, rate_limit_status="2/minute")
    job = upload(app).get_json()["status_url"]
    client = app.test_client()
    assert [client.get(job).status_code for _ in range(3)] == [200, 200, 429]
    assert upload(app).status_code == 202


def test_limits_can_be_turned_off(redis_url: str, tmp_path: Path) -> None:
    app, _ = app_with(redis_url, tmp_path, rate_limit_uploads="", max_queued_predictions=0)
    assert all(upload(app).status_code == 202 for _ in range(12))
