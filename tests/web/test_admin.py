"""The admin API and page through Flask's test client, against a real Redis and no worker.

The model folder is a copy of the session's tiny model (version 1) plus a version 2 made by
copying it and editing its metadata, with an evaluation and training curves: the web process only
reads metadata, so no TensorFlow is needed beyond building the session's tiny model.
"""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests.conftest import CLASSES, EVALUATION, TINY_SIZE, curves_png, make_settings
from tests.web.conftest import assert_error, assert_runs_without_tensorflow
from worker.app import TASK_TRAIN
from worker.client import Keys
from worker.settings import Settings

ADMIN = "/api/v1/admin"
TOKEN = "s3cret-admin-token-for-tests"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
UNKNOWN_JOB = "0" * 32

# Every admin route with every method it answers (test_every_admin_route_is_listed keeps this
# list complete).
ROUTES = [
    ("POST", "/training-jobs"),
    ("GET", "/training-jobs"),
    ("GET", f"/training-jobs/{UNKNOWN_JOB}"),
    ("DELETE", f"/training-jobs/{UNKNOWN_JOB}"),
    ("GET", "/models"),
    ("GET", "/models/1"),
    ("GET", "/models/2/curves.png"),
    ("GET", "/models/2/card"),
    ("PUT", "/models/2/gate"),
    ("POST", "/models/2/promote"),
    ("POST", "/models/1/pin"),
    ("POST", "/models/rollback"),
    ("GET", "/audit"),
    ("GET", "/eval-datasets"),
    ("PUT", "/eval-datasets/1"),
    ("DELETE", "/eval-datasets/1"),
]
BAD_AUTH: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {TOKEN.upper()}"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
    {"Authorization": "Bearer sécret"},  # non-ASCII must be refused, not crash the compare
    {"Authorization": "Bearer "},
]


@pytest.fixture
def admin_settings(
    redis_url: str, redis_client: redis.Redis, model_dir: Path
) -> Iterator[Settings]:
    """Settings with the admin API enabled; their Redis keys and queues are removed afterwards."""
    settings = make_settings(redis_url, model_dir, admin_token=TOKEN)
    yield settings
    for pattern in (f"{settings.key_prefix}:*", f"*{settings.training_queue}*"):
        for key in redis_client.scan_iter(match=pattern):
            redis_client.delete(key)
    redis_client.delete(settings.training_queue, settings.inference_queue)


@pytest.fixture
def admin_app(admin_settings: Settings) -> Flask:
    """The web app with the admin API enabled (token ``TOKEN``), no worker."""
    from web import create_app

    return create_app({"TESTING": True, "CXR_SETTINGS": admin_settings})


@pytest.fixture
def admin(admin_app: Flask) -> FlaskClient:
    """A test client of :func:`admin_app`."""
    return admin_app.test_client()


def auth(actor: str | None = None, token: str = TOKEN) -> dict[str, str]:
    """Headers of an authenticated admin request."""
    headers = {"Authorization": f"Bearer {token}"}
    if actor is not None:
        headers["X-Actor"] = actor
    return headers


def call(
    client: FlaskClient,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> TestResponse:
    """Send ``method path`` to the admin API (JSON ``body`` if given; token unless ``headers``)."""
    kwargs: dict[str, Any] = {"headers": auth() if headers is None else headers}
    if body is not None:
        kwargs["json"] = body
    return client.open(ADMIN + path, method=method, **kwargs)


def ok_json(response: TestResponse, status: int = 200) -> Any:
    """Check the status and return the JSON body."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    return response.get_json()


def submit(client: FlaskClient, body: Any = None, actor: str | None = None) -> str:
    """Queue a training job and return its id."""
    doc = ok_json(call(client, "POST", "/training-jobs", body or {}, auth(actor)), 202)
    return str(doc["id"])


def active_in_redis(redis_client: redis.Redis, settings: Settings) -> int | None:
    """The active version as stored in Redis."""
    raw = redis_client.get(Keys(settings.key_prefix).active_version())
    return int(raw) if raw is not None else None


# --- authentication ---------------------------------------------------------------------------


def test_every_admin_route_is_listed(admin_app: Flask) -> None:
    listed = {(m, re.sub(r"/(\d+|0{32})(?=/|$)", "/<>", p)) for m, p in ROUTES}
    for rule in admin_app.url_map.iter_rules():
        if rule.endpoint.startswith("admin."):
            path = re.sub(r"<[^>]+>", "<>", rule.rule).removeprefix(ADMIN)
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                assert (method, path) in listed, f"{method} {rule.rule} is not in ROUTES"


@pytest.mark.parametrize("headers", BAD_AUTH, ids=lambda h: h.get("Authorization", "none"))
@pytest.mark.parametrize(("method", "path"), ROUTES, ids=lambda x: x)
def test_routes_refuse_a_missing_or_wrong_token(
    admin: FlaskClient,
    admin_settings: Settings,
    redis_client: redis.Redis,
    method: str,
    path: str,
    headers: dict[str, str],
) -> None:
    response = call(admin, method, path, body={}, headers=headers)
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # Nothing happened behind the refusal.
    assert redis_client.llen(admin_settings.training_queue) == 0
    assert active_in_redis(redis_client, admin_settings) is None


@pytest.mark.parametrize("token", [None, ""], ids=["unset", "empty"])
@pytest.mark.parametrize(("method", "path"), ROUTES, ids=lambda x: x)
def test_routes_are_disabled_without_a_configured_token(
    redis_url: str, model_dir: Path, method: str, path: str, token: str | None
) -> None:
    from web import create_app

    settings = make_settings(redis_url, model_dir, admin_token=token)
    client = create_app({"TESTING": True, "CXR_SETTINGS": settings}).test_client()
    # Disabled means disabled: any token, or none, gets the same answer.
    for headers in ({}, auth(), auth(token="")):
        body = assert_error(call(client, method, path, {}, headers), 403, "admin_disabled")
        assert "CXR_ADMIN_TOKEN" in body["message"]


def test_token_is_compared_in_constant_time(
    admin: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hmac

    import web.admin

    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(web.admin.hmac, "compare_digest", spy)
    assert call(admin, "GET", "/models").status_code == 200
    assert call(admin, "GET", "/models", headers=auth(token="nope")).status_code == 401
    assert seen == [(TOKEN.encode(), TOKEN.encode()), (b"nope", TOKEN.encode())]


def test_bearer_scheme_is_case_insensitive(admin: FlaskClient) -> None:
    headers = {"Authorization": f"bearer {TOKEN}"}
    assert call(admin, "GET", "/models", headers=headers).status_code == 200


def test_admin_answers_are_not_cached(admin: FlaskClient) -> None:
    assert call(admin, "GET", "/models").headers["Cache-Control"] == "no-store"
    assert call(admin, "GET", "/models", headers={}).status_code == 401


# --- fine-tuning jobs -------------------------------------------------------------------------


def test_submit_queues_on_the_training_queue(
    admin: FlaskClient, admin_settings: Settings, redis_client: redis.Redis
) -> None:
    body = {"dataset": "cxr-small", "epochs_head": 1, "epochs_finetune": 0, "input_size": 32}
    response = call(admin, "POST", "/training-jobs", body, auth("alice"))
    doc = ok_json(response, 202)
    assert JOB_ID.match(doc["id"])
    assert doc["status"] == "queued"
    assert doc["status_url"] == f"{ADMIN}/training-jobs/{doc['id']}"
    assert response.headers["Location"] == doc["status_url"]

    assert redis_client.llen(admin_settings.training_queue) == 1
    assert redis_client.llen(admin_settings.inference_queue) == 0
    message = json.loads(redis_client.lindex(admin_settings.training_queue, 0))
    assert message["headers"]["task"] == TASK_TRAIN
    assert message["headers"]["id"] == doc["id"]

    job = ok_json(admin.get(doc["status_url"], headers=auth()))
    assert job["id"] == doc["id"]
    assert job["status"] == "queued"
    assert job["actor"] == "admin:alice"
    assert job["cancel_requested"] is False
    params = job["params"]
    assert params["dataset"] == "cxr-small"
    assert (params["epochs_head"], params["epochs_finetune"], params["input_size"]) == (1, 0, 32)
    assert params["base"] == "imagenet"
    assert params["promotion"] == admin_settings.promotion_policy


def test_submit_with_an_empty_body_uses_the_defaults(admin: FlaskClient) -> None:
    response = admin.post(f"{ADMIN}/training-jobs", headers=auth())
    job = ok_json(admin.get(ok_json(response, 202)["status_url"], headers=auth()))
    assert job["actor"] == "admin"
    assert job["params"]["input_size"] == 224
    assert job["params"]["dataset"] == "."


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"epochs_head": -1}, "epochs_head"),
        ({"input_size": 16}, "input_size"),
        ({"learning_rate_head": 0}, "learning_rate_head"),
        ({"unknown": 1}, "unknown"),
        ({"dataset": "../../etc"}, "dataset"),
        ({"base": "/abs/weights.h5"}, "base"),
        ({"epochs_head": 0, "epochs_finetune": 0}, "epochs_finetune"),
        ({"promotion": "sometimes"}, "promotion"),
        ({"batch_size": "many"}, "batch_size"),
    ],
)
def test_submit_refuses_invalid_fields(
    admin: FlaskClient,
    admin_settings: Settings,
    redis_client: redis.Redis,
    body: dict[str, Any],
    field: str,
) -> None:
    error = assert_error(call(admin, "POST", "/training-jobs", body), 400, "invalid_request")
    assert [d["loc"] for d in error["details"]] == [[field]]
    assert all(d["msg"] and d["type"] for d in error["details"])
    assert redis_client.llen(admin_settings.training_queue) == 0
    assert ok_json(call(admin, "GET", "/training-jobs"))["jobs"] == []


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_submit_refuses_a_body_that_is_not_a_json_object(
    admin: FlaskClient, admin_settings: Settings, redis_client: redis.Redis, raw: bytes
) -> None:
    response = admin.post(
        f"{ADMIN}/training-jobs", data=raw, headers=auth(), content_type="application/json"
    )
    error = assert_error(response, 400, "invalid_request")
    assert error["details"] == []
    assert redis_client.llen(admin_settings.training_queue) == 0


def test_base_active_needs_an_active_version(
    admin: FlaskClient, admin_settings: Settings, redis_client: redis.Redis
) -> None:
    response = call(admin, "POST", "/training-jobs", {"base": "active"})
    assert_error(response, 409, "no_active_version")
    assert redis_client.llen(admin_settings.training_queue) == 0
    ok_json(call(admin, "POST", "/models/1/promote"))
    ok_json(call(admin, "POST", "/training-jobs", {"base": "active"}), 202)
    assert redis_client.llen(admin_settings.training_queue) == 1


def test_list_jobs_newest_first_with_limit(admin: FlaskClient) -> None:
    ids = [submit(admin) for _ in range(3)]
    jobs = ok_json(call(admin, "GET", "/training-jobs"))["jobs"]
    assert [j["id"] for j in jobs] == ids[::-1]
    limited = ok_json(call(admin, "GET", "/training-jobs?limit=2"))["jobs"]
    assert [j["id"] for j in limited] == ids[:0:-1]
    for bad in ("0", "-1", "abc", "100000"):
        assert_error(call(admin, "GET", f"/training-jobs?limit={bad}"), 400, "invalid_request")


@pytest.mark.parametrize("job_id", [UNKNOWN_JOB, "not-an-id"])
def test_unknown_job_is_404(admin: FlaskClient, job_id: str) -> None:
    assert_error(call(admin, "GET", f"/training-jobs/{job_id}"), 404, "not_found")
    assert_error(call(admin, "DELETE", f"/training-jobs/{job_id}"), 404, "not_found")


def test_cancel_a_queued_job_then_again(admin: FlaskClient) -> None:
    job_id = submit(admin)
    doc = ok_json(call(admin, "DELETE", f"/training-jobs/{job_id}"), 202)
    assert doc["status"] == "cancelled"
    assert doc["cancel_requested"] is True
    assert "finished_at" in doc
    assert ok_json(call(admin, "GET", f"/training-jobs/{job_id}"))["status"] == "cancelled"
    error = assert_error(call(admin, "DELETE", f"/training-jobs/{job_id}"), 409, "not_cancellable")
    assert error["status"] == "cancelled"


def test_cancel_a_running_job_asks_it_to_stop(
    admin: FlaskClient, admin_settings: Settings, redis_client: redis.Redis
) -> None:
    job_id = submit(admin)
    key = Keys(admin_settings.key_prefix).training_job(job_id)
    progress = {"phase": "head", "epoch": 1, "total_epochs": 4, "metrics": {}, "eta_seconds": 9}
    redis_client.hset(key, mapping={"status": "running", "progress": json.dumps(progress)})
    doc = ok_json(call(admin, "DELETE", f"/training-jobs/{job_id}"), 202)
    # The trainer stops at its next batch; until then the job is still running.
    assert doc["status"] == "running"
    assert doc["cancel_requested"] is True
    assert doc["progress"] == progress


def test_a_finished_job_is_not_cancellable(
    admin: FlaskClient, admin_settings: Settings, redis_client: redis.Redis
) -> None:
    job_id = submit(admin)
    key = Keys(admin_settings.key_prefix).training_job(job_id)
    redis_client.hset(key, mapping={"status": "done", "outcome": json.dumps({"version": 3})})
    error = assert_error(call(admin, "DELETE", f"/training-jobs/{job_id}"), 409, "not_cancellable")
    assert error["status"] == "done"
    assert ok_json(call(admin, "GET", f"/training-jobs/{job_id}"))["cancel_requested"] is False


# --- model versions -----------------------------------------------------------------------------

SUMMARY_FIELDS = {
    "version",
    "created_at",
    "parent_version",
    "base_weights",
    "input_size",
    "class_names",
    "metrics",
    "training_seconds",
    "job_id",
    "decision_threshold",
    "active",
    "has_curves",
    "trained",
    "external",
    "gate",
}


def test_models_list_newest_first(admin: FlaskClient) -> None:
    doc = ok_json(call(admin, "GET", "/models"))
    assert doc["active_version"] is None
    versions = doc["versions"]
    assert [v["version"] for v in versions] == [2, 1]
    for v in versions:
        assert set(v) == SUMMARY_FIELDS
        assert v["input_size"] == TINY_SIZE
        assert v["class_names"] == CLASSES
        assert v["active"] is False
    two, one = versions
    assert (two["has_curves"], one["has_curves"]) == (True, False)
    assert two["parent_version"] == 1
    assert two["metrics"]["roc_auc"] == EVALUATION["roc_auc"]
    assert one["metrics"] == {}
    assert (two["trained"], one["trained"]) == (True, False)  # 1: a bare save, never trained


def test_models_list_skips_a_broken_version(admin: FlaskClient, model_dir: Path) -> None:
    shutil.copytree(model_dir / "1", model_dir / "3", symlinks=True)
    (model_dir / "3" / "metadata.json").write_text("{not json")
    assert [v["version"] for v in ok_json(call(admin, "GET", "/models"))["versions"]] == [2, 1]
    assert_error(call(admin, "GET", "/models/3"), 404, "not_found")


def test_models_list_of_an_empty_folder(redis_url: str, tmp_path: Path) -> None:
    from web import create_app

    settings = make_settings(redis_url, tmp_path / "none", admin_token=TOKEN)
    client = create_app({"TESTING": True, "CXR_SETTINGS": settings}).test_client()
    assert ok_json(call(client, "GET", "/models")) == {"active_version": None, "versions": []}


def test_model_detail(admin: FlaskClient) -> None:
    two = ok_json(call(admin, "GET", "/models/2"))
    assert two["version"] == 2
    assert two["evaluation"] == EVALUATION
    assert two["active"] is False
    assert two["has_curves"] is True
    assert two["job_id"] == "a" * 32
    one = ok_json(call(admin, "GET", "/models/1"))
    assert one["evaluation"] is None
    assert one["class_names"] == CLASSES
    assert_error(call(admin, "GET", "/models/9"), 404, "not_found")
    assert_error(call(admin, "GET", "/models/abc"), 404, "not_found")


def test_curves(admin: FlaskClient) -> None:
    response = call(admin, "GET", "/models/2/curves.png")
    assert response.status_code == 200
    assert response.mimetype == "image/png"
    assert response.data == curves_png()
    assert response.headers["Cache-Control"] == "no-store"
    response.close()  # send_file streams from an open file
    assert_error(call(admin, "GET", "/models/1/curves.png"), 404, "not_found")
    assert_error(call(admin, "GET", "/models/9/curves.png"), 404, "not_found")


# --- the active pointer -----------------------------------------------------------------------


def test_promote_changes_the_active_version(
    admin: FlaskClient, admin_settings: Settings, redis_client: redis.Redis, model_dir: Path
) -> None:
    # No worker in this test: not ready (503), before the promotion and after it.
    ready_before = ok_json(admin.get("/readyz"), 503)
    doc = ok_json(call(admin, "POST", "/models/2/promote", {"reason": "better AUC"}, auth("carol")))
    assert doc["active_version"] == 2
    audit = doc["audit"]
    assert audit["action"] == "promote"
    assert audit["actor"] == "admin:carol"
    assert (audit["from_version"], audit["to_version"]) == (None, 2)
    assert audit["reason"] == "better AUC"

    assert active_in_redis(redis_client, admin_settings) == 2
    assert json.loads((model_dir / "active.json").read_text())["version"] == 2
    models = ok_json(call(admin, "GET", "/models"))
    assert models["active_version"] == 2
    assert [v["active"] for v in models["versions"]] == [True, False]
    assert ok_json(call(admin, "GET", "/models/2"))["active"] is True
    # Readiness reports the workers, not the pointer: a promotion does not change it.
    assert ok_json(admin.get("/readyz"), 503) == ready_before

    entries = ok_json(call(admin, "GET", "/audit"))["entries"]
    assert entries == [audit]


def test_promote_refuses_unknown_versions_and_bad_bodies(
    admin: FlaskClient, admin_settings: Settings, redis_client: redis.Redis
) -> None:
    assert_error(call(admin, "POST", "/models/7/promote"), 404, "not_found")
    assert_error(call(admin, "POST", "/models/7/pin"), 404, "not_found")
    for body in ({"reason": 5}, {"reason": "x" * 501}, {"why": "no"}, [1]):
        response = call(admin, "POST", "/models/2/promote", body)
        assert_error(response, 400, "invalid_request")
    assert active_in_redis(redis_client, admin_settings) is None
    assert ok_json(call(admin, "GET", "/audit"))["entries"] == []


def test_pin_and_rollback(
    admin: FlaskClient, admin_settings: Settings, redis_client: redis.Redis
) -> None:
    ok_json(call(admin, "POST", "/models/2/promote"))
    pinned = ok_json(call(admin, "POST", "/models/1/pin", {"reason": "v2 misbehaves"}))
    assert pinned["active_version"] == 1
    assert pinned["audit"]["action"] == "pin"
    assert (pinned["audit"]["from_version"], pinned["audit"]["to_version"]) == (2, 1)
    assert active_in_redis(redis_client, admin_settings) == 1

    back = ok_json(call(admin, "POST", "/models/rollback", headers=auth("dave")))
    assert back["active_version"] == 2
    assert back["audit"]["action"] == "rollback"
    assert back["audit"]["actor"] == "admin:dave"
    assert (back["audit"]["from_version"], back["audit"]["to_version"]) == (1, 2)
    assert active_in_redis(redis_client, admin_settings) == 2

    # The first promotion had nothing before it: the history is used up.
    error = assert_error(call(admin, "POST", "/models/rollback"), 409, "no_previous_version")
    assert "previous" in error["message"]
    assert active_in_redis(redis_client, admin_settings) == 2


def test_rollback_with_no_history_is_409(admin: FlaskClient) -> None:
    assert_error(call(admin, "POST", "/models/rollback"), 409, "no_previous_version")
    assert ok_json(call(admin, "GET", "/audit"))["entries"] == []


def test_audit_newest_first_with_limit(admin: FlaskClient) -> None:
    for path in ("/models/1/promote", "/models/2/promote", "/models/1/pin"):
        ok_json(call(admin, "POST", path))
    entries = ok_json(call(admin, "GET", "/audit"))["entries"]
    assert [(e["action"], e["to_version"]) for e in entries] == [
        ("pin", 1),
        ("promote", 2),
        ("promote", 1),
    ]
    assert ok_json(call(admin, "GET", "/audit?limit=2"))["entries"] == entries[:2]
    assert_error(call(admin, "GET", "/audit?limit=0"), 400, "invalid_request")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("  erin  ", "admin:erin"),
        ("erin@example.org", "admin:erin@example.org"),
        ("eve\x1b[31m: red", "admin:eve31m red"),  # an ANSI escape, and no ":" to forge
        ("<script>", "admin:script"),
        ("\t \x00", "admin"),
        ("z" * 200, "admin:" + "z" * 64),
    ],
)
def test_actor_header_is_sanitised(admin: FlaskClient, header: str, expected: str) -> None:
    doc = ok_json(call(admin, "POST", "/models/1/promote", headers=auth(header)))
    assert doc["audit"]["actor"] == expected


# --- the page ---------------------------------------------------------------------------------


def test_admin_page_asks_for_the_token(admin: FlaskClient) -> None:
    response = admin.get("/admin")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert re.search(r'<input[^>]+type="password"', page)
    assert "Admin token" in page
    assert 'src="/static/admin.js"' in page
    assert 'data-api="/api/v1/admin"' in page
    assert 'href="/static/style.css"' in page
    # The page carries no data: versions and jobs come from the API, with the token.
    assert "evaluation" not in page
    assert "curves.png" not in page


def test_admin_page_is_served_without_a_token_configured(redis_url: str, model_dir: Path) -> None:
    from web import create_app

    settings = make_settings(redis_url, model_dir)
    response = create_app({"TESTING": True, "CXR_SETTINGS": settings}).test_client().get("/admin")
    assert response.status_code == 200


def test_admin_script_is_served(admin: FlaskClient) -> None:
    response = admin.get("/static/admin.js")
    assert response.status_code == 200
    assert "javascript" in response.mimetype
    script = response.get_data(as_text=True)
    assert "Authorization" in script
    assert "sessionStorage" in script
    assert "createObjectURL" in script
    # Data from the API is written as text only.
    assert "innerHTML" not in script
    assert "insertAdjacentHTML" not in script
    response.close()


# --- the web process stays TensorFlow-free ----------------------------------------------------

NO_TF_SCRIPT = textwrap.dedent(
    """
    import os
    import sys
    from web import create_app

    client = create_app().test_client()
    headers = {"Authorization": f"Bearer {os.environ['CXR_ADMIN_TOKEN']}", "X-Actor": "subprocess"}
    for method, path, status in [
        ("GET", "/api/v1/admin/models", 200),
        ("GET", "/api/v1/admin/models/2", 200),
        ("POST", "/api/v1/admin/models/2/promote", 200),
        ("POST", "/api/v1/admin/training-jobs", 202),
        ("GET", "/api/v1/admin/audit", 200),
        ("GET", "/admin", 200),
    ]:
        response = client.open(path, method=method, headers=headers)
        assert response.status_code == status, (path, response.get_data(as_text=True))
    """
)


def test_admin_never_imports_tensorflow(
    admin_settings: Settings, redis_client: redis.Redis
) -> None:
    assert_runs_without_tensorflow(NO_TF_SCRIPT, admin_settings)
    assert redis_client.llen(admin_settings.training_queue) == 1
    assert redis_client.get(f"{admin_settings.key_prefix}:model:active") == b"2"


# --- hostile and careless requests (issue 13) -----------------------------------------------


def test_a_huge_string_field_is_refused_and_never_stored(
    admin: FlaskClient, admin_settings: Settings, redis_client: redis.Redis
) -> None:
    r = admin.post(ADMIN + "/training-jobs", json={"dataset": "x" * 300}, headers=auth())
    assert r.status_code == 400 and r.get_json()["error"] == "invalid_request"
    assert not list(redis_client.scan_iter(match=f"{admin_settings.key_prefix}:train:*"))


def test_an_oversized_body_is_413_on_every_admin_route(admin: FlaskClient) -> None:
    big = json.dumps({"dataset": "x" * (70 * 1024)})
    for path in ("/training-jobs", "/models/1/promote", "/models/rollback"):
        r = admin.post(ADMIN + path, data=big, content_type="application/json", headers=auth())
        assert r.status_code == 413, path
        assert r.get_json()["error"] == "too_large" and "64 KiB" in r.get_json()["message"]


def test_a_missing_dataset_is_refused_where_the_data_can_be_seen(
    redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    from web import create_app

    data = tmp_path / "data"
    (data / "cxr").mkdir(parents=True)
    settings = make_settings(redis_url, model_dir, admin_token=TOKEN, data_dir=data)
    client = create_app({"TESTING": True, "CXR_SETTINGS": settings}).test_client()
    r = client.post(ADMIN + "/training-jobs", json={"dataset": "nope"}, headers=auth())
    assert r.status_code == 422 and r.get_json()["error"] == "dataset_not_found"
    assert r.get_json()["message"] == (
        f"no dataset 'nope' in CXR_DATA_DIR ({settings.data_dir}): name a folder there in the "
        "Kaggle layout <split>/<CLASS>/*"
    )
    ok = client.post(ADMIN + "/training-jobs", json={"dataset": "cxr"}, headers=auth())
    assert ok.status_code == 202 and "warning" not in ok.get_json()


def test_a_dataset_that_cannot_be_checked_is_accepted_with_a_warning(
    admin: FlaskClient, admin_settings: Settings
) -> None:
    assert not admin_settings.data_dir.is_dir()
    r = admin.post(ADMIN + "/training-jobs", json={"dataset": "anything"}, headers=auth())
    assert r.status_code == 202
    assert r.get_json()["warning"] == (
        f"CXR_DATA_DIR ({admin_settings.data_dir}) is not visible to the web process, so the "
        "dataset was not checked; the trainer checks it when the job starts"
    )
