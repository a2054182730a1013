"""The HTML pages through Flask's test client, against a real Redis and no worker."""

from __future__ import annotations

import io
import re
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import redis
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
