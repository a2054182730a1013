"""The JSON API through Flask's test client, against a real Redis and no worker.

With no worker, an accepted job stays "queued", so what the API stored and queued can be read
straight from Redis.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from ml.imaging import decode_image
from tests.web.conftest import (
    assert_error,
    assert_runs_without_tensorflow,
    bmp,
    bomb_png,
    gif,
    heartbeat,
    jpeg,
    png,
    queue_length,
    small_app,
    stored_jobs,
    truncated_jpeg,
)
from worker.app import TASK_PREDICT
from worker.client import Keys
from worker.settings import Settings

API = "/api/v1/predictions"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def post_file(client: FlaskClient, data: bytes, filename: str = "xray.png") -> TestResponse:
    """POST ``data`` to the API as the multipart field ``file``."""
    return client.post(
        API, data={"file": (io.BytesIO(data), filename)}, content_type="multipart/form-data"
    )


def assert_refused(
    response: TestResponse,
    status: int,
    code: str,
    redis_client: redis.Redis,
    settings: Settings,
) -> dict[str, Any]:
    """Check the error and that nothing was stored or queued."""
    body = assert_error(response, status, code)
    assert queue_length(redis_client, settings) == 0
    assert stored_jobs(redis_client, settings) == []
    return body


# --- accepted uploads -------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "filename"), [(png, "chest.png"), (jpeg, "chest.jpg")])
def test_valid_upload_is_queued(
    make: Callable[[], bytes],
    filename: str,
    client: FlaskClient,
    settings: Settings,
    redis_client: redis.Redis,
) -> None:
    data = make()
    response = post_file(client, data, filename)

    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    assert JOB_ID.match(body["id"])
    job_id = body["id"]
    assert body["status"] == "queued"
    assert body["status_url"] == f"{API}/{job_id}"
    assert response.headers["Location"] == body["status_url"]

    status = client.get(body["status_url"])
    assert status.status_code == 200
    doc = status.get_json()
    assert doc["id"] == job_id
    assert doc["status"] == "queued"
    assert doc["filename"] == filename

    # One small Celery message that names the job, not the image.
    assert queue_length(redis_client, settings) == 1
    raw = redis_client.lindex(settings.inference_queue, 0)
    assert raw is not None
    assert len(raw) < 2048
    message = json.loads(raw)
    assert message["headers"]["task"] == TASK_PREDICT
    assert message["headers"]["id"] == job_id
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert args == [job_id]
    assert kwargs == {}

    # The decoded pixels sit in their own key, as a PNG that decodes to exactly what the upload
    # decodes to (issue 7: the web stores the normalised image, not the file); both keys expire.
    keys = Keys(settings.key_prefix)
    stored = redis_client.get(keys.upload(job_id))
    assert stored is not None and stored.startswith(b"\x89PNG")
    assert np.array_equal(decode_image(stored), decode_image(data))
    ttl = settings.result_ttl_seconds
    assert 0 < redis_client.ttl(keys.upload(job_id)) <= ttl
    assert 0 < redis_client.ttl(keys.job(job_id)) <= ttl


def test_each_upload_gets_its_own_id(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    ids = {post_file(client, png()).get_json()["id"] for _ in range(3)}
    assert len(ids) == 3
    assert queue_length(redis_client, settings) == 3


def test_upload_under_the_size_limit_is_accepted(
    redis_url: str, tmp_path: Path, redis_client: redis.Redis
) -> None:
    app, settings = small_app(redis_url, tmp_path)
    small = app.test_client()
    data = png()
    assert len(data) < 0.01 * 1024 * 1024
    assert post_file(small, data).status_code == 202
    assert queue_length(redis_client, settings) == 1


# --- refused uploads --------------------------------------------------------------------------


def test_missing_file_field(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    response = client.post(
        API,
        data={"image": (io.BytesIO(png()), "x.png")},
        content_type="multipart/form-data",
    )
    body = assert_refused(response, 400, "missing_file", redis_client, settings)
    assert "'file'" in body["message"]


def test_missing_body(client: FlaskClient, settings: Settings, redis_client: redis.Redis) -> None:
    assert_refused(client.post(API), 400, "missing_file", redis_client, settings)


@pytest.mark.parametrize(
    ("make", "filename", "status", "code"),
    [
        (lambda: b"", "x.png", 400, "empty"),
        (lambda: b"this is not an image\n" * 10, "x.png", 400, "corrupt"),
        (truncated_jpeg, "x.jpg", 400, "corrupt"),
        (gif, "x.gif", 415, "unsupported_format"),
        (gif, "disguised.png", 415, "unsupported_format"),
        (bmp, "x.bmp", 415, "unsupported_format"),
        (bomb_png, "bomb.png", 413, "too_many_pixels"),
    ],
    ids=["empty", "text", "truncated-jpeg", "gif", "gif-named-png", "bmp", "pixel-bomb"],
)
def test_bad_image_is_refused(
    make: Callable[[], bytes],
    filename: str,
    status: int,
    code: str,
    client: FlaskClient,
    settings: Settings,
    redis_client: redis.Redis,
) -> None:
    assert_refused(post_file(client, make(), filename), status, code, redis_client, settings)


def test_bomb_is_refused_quickly(client: FlaskClient) -> None:
    started = time.monotonic()
    assert post_file(client, bomb_png()).status_code == 413
    # Checked from the header: 400 M pixels are never decoded.
    assert time.monotonic() - started < 2


def test_upload_over_the_size_limit(
    redis_url: str, tmp_path: Path, redis_client: redis.Redis
) -> None:
    app, settings = small_app(redis_url, tmp_path)
    small = app.test_client()
    body = assert_refused(
        post_file(small, b"\0" * 50_000), 413, "too_large", redis_client, settings
    )
    assert "MiB limit" in body["message"]


# --- polling ----------------------------------------------------------------------------------


def test_unknown_id_is_404(client: FlaskClient) -> None:
    body = assert_error(client.get(f"{API}/{uuid.uuid4().hex}"), 404, "not_found")
    assert "never issued" in body["message"]


@pytest.mark.parametrize(
    "job_id", ["nope", "0" * 31, "0" * 33, "G" * 32, uuid.uuid4().hex.upper(), "../../x"]
)
def test_malformed_id_is_404(job_id: str, client: FlaskClient) -> None:
    response = client.get(f"{API}/{job_id}")
    assert response.status_code == 404
    assert response.is_json
    assert response.get_json()["error"] == "not_found"


def test_expired_job_is_404(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    job_id = post_file(client, png()).get_json()["id"]
    assert client.get(f"{API}/{job_id}").status_code == 200
    keys = Keys(settings.key_prefix)
    assert redis_client.delete(keys.job(job_id), keys.upload(job_id)) == 2
    assert_error(client.get(f"{API}/{job_id}"), 404, "not_found")


# --- workers and their model ------------------------------------------------------------------


@pytest.mark.parametrize("state", ["no_model", "error"])
def test_no_model_is_503(
    state: str, client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, state, None)
    body = assert_refused(post_file(client, png()), 503, "no_model", redis_client, settings)
    assert "cxr init-model" in body["message"]
    # A compose user is told the whole command.
    assert "`docker compose run --rm worker cxr init-model --base imagenet`" in body["message"]


def test_bad_image_wins_over_no_model(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, "no_model", None)
    assert_refused(post_file(client, b"text"), 400, "corrupt", redis_client, settings)


def test_serving_worker_accepts(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, "serving", 1)
    assert post_file(client, png()).status_code == 202
    assert queue_length(redis_client, settings) == 1


def test_one_serving_worker_is_enough(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, "no_model", None, name="fake:1")
    heartbeat(redis_client, settings, "serving", 1, name="fake:2")
    assert post_file(client, png()).status_code == 202


def test_a_refusal_for_no_model_is_not_remembered(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, "no_model", None)
    assert_refused(post_file(client, png()), 503, "no_model", redis_client, settings)
    heartbeat(redis_client, settings, "serving", 1)  # the model arrives: the next upload is taken
    assert post_file(client, png()).status_code == 202


def test_a_serving_worker_is_remembered_for_the_serving_check_seconds(
    client: FlaskClient,
    settings: Settings,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("worker.client.SERVING_CHECK_SECONDS", 0.5)
    heartbeat(redis_client, settings, "serving", 1)
    assert post_file(client, png()).status_code == 202
    started = time.monotonic()
    heartbeat(redis_client, settings, "no_model", None)  # the model goes away
    assert post_file(client, png()).status_code == 202  # heartbeats not read again yet
    assert queue_length(redis_client, settings) == 2
    time.sleep(max(0.0, 0.55 - (time.monotonic() - started)))
    assert_error(post_file(client, png()), 503, "no_model")
    assert queue_length(redis_client, settings) == 2


def test_no_worker_at_all_queues(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    assert redis_client.exists(Keys(settings.key_prefix).worker("fake:1")) == 0
    assert post_file(client, jpeg(), "x.jpg").status_code == 202
    assert queue_length(redis_client, settings) == 1


# --- routing errors are JSON ------------------------------------------------------------------


def test_unknown_api_route_is_json_404(client: FlaskClient) -> None:
    assert_error(client.get("/api/v1/nothing-here"), 404, "not_found")


def test_post_to_status_url_is_json_405(client: FlaskClient) -> None:
    assert_error(client.post(f"{API}/{uuid.uuid4().hex}"), 405, "method_not_allowed")


def test_get_on_submit_url_is_json_405(client: FlaskClient) -> None:
    assert_error(client.get(API), 405, "method_not_allowed")


def test_405_names_the_allowed_methods(client: FlaskClient) -> None:
    response = client.post(f"{API}/{uuid.uuid4().hex}")
    assert "GET" in response.headers.get("Allow", "")


# --- Redis down -------------------------------------------------------------------------------


def test_redis_unreachable_is_503(down_app: Flask) -> None:
    response = post_file(down_app.test_client(), png())
    assert_error(response, 503, "unavailable")


def test_redis_unreachable_on_poll_is_503(down_app: Flask) -> None:
    response = down_app.test_client().get(f"{API}/{uuid.uuid4().hex}")
    assert_error(response, 503, "unavailable")


# --- the web process stays TensorFlow-free ----------------------------------------------------

NO_TF_SCRIPT = """
import io, sys
from PIL import Image
from web import create_app

app = create_app()
buffer = io.BytesIO()
Image.new("L", (64, 64), 128).save(buffer, "PNG")
response = app.test_client().post(
    "/api/v1/predictions",
    data={"file": (io.BytesIO(buffer.getvalue()), "x.png")},
    content_type="multipart/form-data",
)
assert response.status_code == 202, response.get_data(as_text=True)
"""


def test_web_never_imports_tensorflow(settings: Settings, redis_client: redis.Redis) -> None:
    assert_runs_without_tensorflow(NO_TF_SCRIPT, settings)
    assert redis_client.llen(settings.inference_queue) == 1


def test_long_poll_without_a_worker_times_out_as_queued(client: FlaskClient) -> None:
    response = client.post(API, data={"file": (io.BytesIO(png()), "x.png")})
    started = time.monotonic()
    doc = client.get(response.headers["Location"] + "?wait=0.5").get_json()
    assert doc["status"] == "queued"
    assert 0.4 < time.monotonic() - started < 5


def test_long_poll_rejects_a_bad_wait(client: FlaskClient) -> None:
    response = client.post(API, data={"file": (io.BytesIO(png()), "x.png")})
    assert_error(client.get(response.headers["Location"] + "?wait=soon"), 400, "invalid_wait")
