"""The HTML pages through Flask's test client, against a real Redis and no worker."""

from __future__ import annotations

import io
import json
import re
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import redis
from flask import Flask, render_template
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests.web.conftest import (
    gif,
    heartbeat,
    jpeg,
    png,
    queue_length,
    small_app,
    stored_jobs,
)
from worker.client import Keys
from worker.settings import Settings

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def post_files(client: FlaskClient, *files: tuple[bytes, str]) -> TestResponse:
    """POST ``(data, filename)`` pairs to the upload form as the multipart field ``files``."""
    return client.post(
        "/",
        data={"files": [(io.BytesIO(data), name) for data, name in files]},
        content_type="multipart/form-data",
    )


def html(response: TestResponse) -> str:
    """The body of an HTML response."""
    assert response.mimetype == "text/html", response.content_type
    return response.get_data(as_text=True)


def result_ids(location: str) -> list[str]:
    """The job ids in a /results URL."""
    parts = urlsplit(location)
    assert parts.path == "/results"
    return parse_qs(parts.query)["id"]


# --- the upload form --------------------------------------------------------------------------


def test_index_has_the_upload_form(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, "serving", 1)  # no notice while a model is served
    response = client.get("/")
    assert response.status_code == 200
    page = html(response)
    form = re.search(r"<form\b[^>]*>", page)
    assert form is not None
    assert 'method="post"' in form.group(0)
    assert 'enctype="multipart/form-data"' in form.group(0)
    file_input = re.search(r'<input\b[^>]*\bname="files"[^>]*>', page)
    assert file_input is not None
    assert 'type="file"' in file_input.group(0)
    assert re.search(r"\bmultiple\b", file_input.group(0))
    assert 'class="notice"' not in page
    assert "style.css" in page


def test_index_shows_the_no_model_notice(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, "no_model", None)
    page = html(client.get("/"))
    assert 'class="notice"' in page
    assert_names_both_commands_as_code(page)


DOCKER_INIT = "docker compose run --rm worker cxr init-model --base imagenet"


def assert_names_both_commands_as_code(page: str) -> None:
    """The no-model notice names the compose and the local command, set as <code>."""
    notice = re.search(r'<p class="notice"[^>]*>(.*?)</p>', page, re.S)
    assert notice is not None
    assert f"<code>{DOCKER_INIT}</code>" in notice.group(1)
    assert "<code>cxr init-model</code>" in notice.group(1)
    assert "`" not in page, "literal backticks on the page"


def test_code_spans_escape_their_content() -> None:
    from web.pages import code_spans

    assert str(code_spans("run `a <b>` & `c`")) == (
        "run <code>a &lt;b&gt;</code> &amp; <code>c</code>"
    )
    assert str(code_spans("<i>no code</i>")) == "&lt;i&gt;no code&lt;/i&gt;"


def test_index_has_no_notice_while_serving(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, "serving", 1)
    assert "cxr init-model" not in html(client.get("/"))


# --- uploading --------------------------------------------------------------------------------


def test_upload_redirects_to_the_results(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    response = post_files(client, (png(), "a.png"), (jpeg(), "b.jpg"))

    assert response.status_code == 303
    ids = result_ids(response.headers["Location"])
    assert len(ids) == 2 and len(set(ids)) == 2
    assert all(JOB_ID.match(i) for i in ids)
    assert queue_length(redis_client, settings) == 2
    keys = Keys(settings.key_prefix)
    assert [redis_client.hget(keys.job(i), "filename") for i in ids] == [b"a.png", b"b.jpg"]

    page = client.get(response.headers["Location"])
    assert page.status_code == 200
    text = html(page)
    assert re.findall(r'data-job="([0-9a-f]{32})"', text) == ids
    for job_id in ids:
        assert f'data-url="/api/v1/predictions/{job_id}"' in text
    assert re.search(r'<script src="/static/results\.js"', text)


def test_one_bad_file_lists_it_and_links_the_good_one(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    response = post_files(client, (png(), "good.png"), (b"not an image at all", "bad.png"))

    assert response.status_code == 400
    page = html(response)
    assert "<strong>bad.png</strong>" in page
    assert "not a PNG or JPEG image" in page
    # The good one was queued anyway, and the page links to its result.
    assert queue_length(redis_client, settings) == 1
    links = re.findall(r'href="(/results\?[^"]+)"', page)
    assert len(links) == 1
    (job_id,) = result_ids(links[0])
    assert redis_client.exists(Keys(settings.key_prefix).job(job_id)) == 1
    assert "good.png" in page


def test_unsupported_file_is_415(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    response = post_files(client, (jpeg(), "good.jpg"), (gif(), "anim.gif"))

    assert response.status_code == 415
    page = html(response)
    assert "<strong>anim.gif</strong>" in page
    assert "GIF images are not accepted" in page
    assert queue_length(redis_client, settings) == 1


def test_no_files_is_400(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    response = client.post("/", data={}, content_type="multipart/form-data")
    assert response.status_code == 400
    assert "Choose at least one X-ray." in html(response)
    assert queue_length(redis_client, settings) == 0


def test_empty_file_field_is_400(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    # What a browser sends when the form is submitted with no file chosen.
    response = post_files(client, (b"", ""))
    assert response.status_code == 400
    assert queue_length(redis_client, settings) == 0


def test_too_large_is_an_html_413(
    redis_url: str, tmp_path: Path, redis_client: redis.Redis
) -> None:
    app, settings = small_app(redis_url, tmp_path)
    response = post_files(app.test_client(), (b"\0" * 50_000, "huge.png"))

    assert response.status_code == 413
    page = html(response)
    assert "MiB limit" in page
    assert "<form" in page
    assert queue_length(redis_client, settings) == 0
    assert stored_jobs(redis_client, settings) == []


def test_no_model_upload_is_503(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, "no_model", None)
    response = post_files(client, (png(), "a.png"))
    assert response.status_code == 503
    assert_names_both_commands_as_code(html(response))
    assert queue_length(redis_client, settings) == 0


# --- the results page -------------------------------------------------------------------------


def test_results_without_ids_is_404(client: FlaskClient) -> None:
    response = client.get("/results")
    assert response.status_code == 404
    assert "No prediction ids given." in html(response)


def test_results_with_only_malformed_ids_is_404(client: FlaskClient) -> None:
    assert client.get("/results?id=nope&id=%3Cscript%3E").status_code == 404


def test_results_drops_malformed_ids(client: FlaskClient) -> None:
    good = uuid.uuid4().hex
    response = client.get(f"/results?id=nope&id={good}&id=<b>x</b>")
    assert response.status_code == 200
    page = html(response)
    assert re.findall(r'data-job="([^"]*)"', page) == [good]
    assert "nope" not in page
    assert "<b>x</b>" not in page


# --- static files -----------------------------------------------------------------------------


def test_static_files_are_served(client: FlaskClient) -> None:
    for path, mimetype in [("/static/results.js", "javascript"), ("/static/style.css", "css")]:
        response = client.get(path)
        try:
            assert response.status_code == 200, path
            assert mimetype in (response.mimetype or "")
            assert response.get_data()
        finally:
            response.close()


def test_the_upload_and_card_scripts_are_served(client: FlaskClient) -> None:
    page = html(client.get("/"))
    assert re.search(r'<script src="/static/card\.js"', page)
    assert re.search(r'<script src="/static/upload\.js"', page)
    assert 'id="dropzone"' in page and re.search(r'id="dropzone"[^>]*\bhidden\b', page)
    for path in ("/static/card.js", "/static/upload.js"):
        response = client.get(path)
        try:
            assert response.status_code == 200 and "javascript" in (response.mimetype or "")
        finally:
            response.close()


# --- the results page without JavaScript ------------------------------------------------------


RESULT = {
    "label": "NORMAL", "probabilities": {"NORMAL": 0.875, "PNEUMONIA": 0.125},
    "model_version": 2, "decision_threshold": 0.25, "batch_size": 1,
    "timings_ms": {"queue": 1.0, "decode": 2.0, "batch_wait": 0.0, "model": 42.0,
                   "worker_total": 45.0},
}  # fmt: skip


def store_job(redis_client: redis.Redis, settings: Settings, **fields: str) -> str:
    """A job hash as web and worker leave it; returns its id."""
    job_id = uuid.uuid4().hex
    key = Keys(settings.key_prefix).job(job_id)
    redis_client.hset(key, mapping={"created_at": "1000.0", "filename": "chest.jpeg", **fields})
    redis_client.expire(key, 60)
    return job_id


def test_results_page_renders_a_finished_job(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    job_id = store_job(
        redis_client, settings, status="done", finished_at="1000.5", result=json.dumps(RESULT)
    )
    page = html(client.get(f"/results?id={job_id}"))
    assert '<p class="status done label-normal">NORMAL</p>' in page
    assert page.count('class="bar-row"') == 2
    assert 'style="width: 87.5%"' in page and "12.5 %" in page
    assert "Model version 2 · screening threshold: a finding when 1 − p(NORMAL) ≥ 0.250" in page
    assert "0.50 s from upload to result (model 42 ms)" in page
    assert f'<a class="json-link" href="/api/v1/predictions/{job_id}">' in page
    assert 'http-equiv="refresh"' not in page  # nothing left to wait for


def test_results_page_reloads_itself_without_javascript_while_jobs_run(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    running = store_job(redis_client, settings, status="running")
    failed = store_job(redis_client, settings, status="failed", error="run `cxr init-model`")
    page = html(client.get(f"/results?id={running}&id={failed}"))
    assert '<noscript><meta http-equiv="refresh" content="3"></noscript>' in page
    assert '<p class="status running">Running…</p>' in page
    assert "Failed: run <code>cxr init-model</code>" in page


def test_results_page_says_an_unknown_id_expired(client: FlaskClient) -> None:
    page = html(client.get(f"/results?id={uuid.uuid4().hex}"))
    assert "expired or never existed" in page
    assert 'http-equiv="refresh"' not in page


def render_results(app: Flask, result: dict[str, object], image_route: bool) -> str:
    """results.html for one done job with ``result`` (fields other branches add included)."""
    from web import pages

    job_id = "0" * 32
    doc = {"id": job_id, "status": "done", "filename": "chest.dcm", "elapsed_ms": 80.0,
           "result": result}  # fmt: skip
    with app.test_request_context("/results"):
        original = pages.has_route
        pages.has_route = lambda path: image_route  # type: ignore[assignment]
        try:
            card = pages.card_view(job_id, doc)
        finally:
            pages.has_route = original
        return render_template("results.html", cards=[card], pending=False)


def test_results_page_shows_the_server_overlay_without_javascript(app: Flask) -> None:
    job = "0" * 32
    explanation = {"method": "grad-cam", "layer": "block5_conv3", "class_explained": "NORMAL",
                   "heatmap_url": f"/api/v1/predictions/{job}/heatmap.png",
                   "map_url": f"/api/v1/predictions/{job}/heatmap.json"}  # fmt: skip
    page = render_results(app, {**RESULT, "explanation": explanation}, image_route=True)
    assert f'src="/api/v1/predictions/{job}/heatmap.png"' in page
    assert f'<a href="/api/v1/predictions/{job}/image.png">' in page
    assert "Grad-CAM for NORMAL" in page

    plain = render_results(app, {**RESULT, "explanation": None}, image_route=True)
    assert f'src="/api/v1/predictions/{job}/image.png"' in plain
    assert "heatmap" not in plain.split('id="results"')[1].split("<script")[0]

    older = render_results(app, RESULT, image_route=False)  # no /image.png on this app
    assert "<figure" not in older and older.count('class="bar-row"') == 2


def test_results_page_says_a_refused_image_is_not_a_chest_xray(app: Flask) -> None:
    ood = {"score": 0.93, "threshold": 0.5, "reason": "looks like a knee"}
    page = render_results(
        app, {**RESULT, "label": None, "out_of_distribution": ood}, image_route=False
    )
    assert (
        '<p class="status refused">Not recognised as a frontal chest X-ray — no prediction</p>'
        in page
    )
    assert '<p class="reason">looks like a knee</p>' in page
    assert 'class="bar-row"' not in page


def test_has_route_knows_the_apps_routes(app: Flask) -> None:
    from web.pages import has_route

    with app.test_request_context("/"):
        assert has_route(f"/api/v1/predictions/{'0' * 32}")
        assert not has_route(f"/api/v1/predictions/{'0' * 32}/no-such.png")
