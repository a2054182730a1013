"""Explanations through the web: the explain flag on the way in, and the image, overlay and map
endpoints on the way out (real Redis, no worker: what a worker stores is written directly)."""

from __future__ import annotations

import io
import json
import uuid

import pytest
import redis
from flask import url_for
from flask.testing import FlaskClient
from PIL import Image

from tests.web.conftest import assert_runs_without_tensorflow, png
from worker.client import Keys
from worker.records import (
    HEATMAP_JSON_PATH,
    HEATMAP_PNG_PATH,
    IMAGE_PNG_PATH,
    Explanation,
    PredictionResult,
    Timings,
)
from worker.settings import Settings

API = "/api/v1/predictions"
MAP_DOC = {
    "method": "grad-cam",
    "layer": "block5_conv3",
    "class_explained": "PNEUMONIA",
    "shape": [2, 2],
    "values": [[0.0, 0.25], [0.5, 1.0]],
}


def submit(client: FlaskClient, query: str = "", **fields: str) -> str:
    data: dict[str, object] = {"file": (io.BytesIO(png()), "x.png"), **fields}
    response = client.post(f"{API}{query}", data=data, content_type="multipart/form-data")
    assert response.status_code == 202, response.get_data(as_text=True)
    job_id: str = response.get_json()["id"]
    return job_id


def explain_field(redis_client: redis.Redis, settings: Settings, job_id: str) -> bytes | None:
    value = redis_client.hget(Keys(settings.key_prefix).job(job_id), "explain")
    return value if isinstance(value, bytes) else None


@pytest.mark.parametrize(
    ("query", "fields", "stored"),
    [
        ("", {}, b"1"),
        ("?explain=0", {}, b"0"),
        ("?explain=false", {}, b"0"),
        ("?explain=1", {}, b"1"),
        ("", {"explain": "0"}, b"0"),
    ],
)
def test_the_flag_travels_with_the_job(
    query: str,
    fields: dict[str, str],
    stored: bytes,
    client: FlaskClient,
    settings: Settings,
    redis_client: redis.Redis,
) -> None:
    job_id = submit(client, query, **fields)
    assert explain_field(redis_client, settings, job_id) == stored


def test_the_form_has_a_checked_explain_box(client: FlaskClient) -> None:
    page = client.get("/").get_data(as_text=True)
    assert 'name="explain" type="checkbox" value="1" checked' in page
    assert "Show where the model looked (Grad-CAM heatmap)" in page


@pytest.mark.parametrize(("values", "stored"), [(["0", "1"], b"1"), (["0"], b"0")])
def test_the_form_checkbox_decides(
    values: list[str],
    stored: bytes,
    client: FlaskClient,
    settings: Settings,
    redis_client: redis.Redis,
) -> None:
    data = {"files": (io.BytesIO(png()), "x.png"), "explain": values}
    response = client.post("/", data=data, content_type="multipart/form-data")
    assert response.status_code == 303, response.get_data(as_text=True)
    job_id = response.headers["Location"].split("id=")[1]
    assert explain_field(redis_client, settings, job_id) == stored


def test_the_stored_image_is_served(client: FlaskClient, settings: Settings) -> None:
    job_id = submit(client)
    response = client.get(f"{API}/{job_id}/image.png")
    assert response.status_code == 200 and response.mimetype == "image/png"
    assert response.headers["Cache-Control"].startswith("private, max-age=")
    with Image.open(io.BytesIO(response.data)) as image:
        assert image.size == (64, 64) and image.mode == "L"
        assert not image.info.get("exif") and not image.text  # pixels only


def test_no_map_yet_is_a_json_404(client: FlaskClient) -> None:
    job_id = submit(client)
    for suffix in ("heatmap.png", "heatmap.json"):
        response = client.get(f"{API}/{job_id}/{suffix}")
        assert response.status_code == 404 and response.is_json
        assert response.get_json()["error"] == "not_found"
        assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("suffix", ["image.png", "heatmap.png", "heatmap.json"])
@pytest.mark.parametrize("job_id", [uuid.uuid4().hex, "not-an-id"])
def test_unknown_ids_are_json_404s(suffix: str, job_id: str, client: FlaskClient) -> None:
    response = client.get(f"{API}/{job_id}/{suffix}")
    assert response.status_code == 404 and response.is_json


def test_the_map_and_overlay_are_served(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    job_id = submit(client)
    redis_client.set(Keys(settings.key_prefix).heatmap(job_id), json.dumps(MAP_DOC), ex=60)

    doc = client.get(f"{API}/{job_id}/heatmap.json")
    assert doc.status_code == 200 and doc.is_json
    assert doc.get_json() == {"id": job_id, **MAP_DOC}
    assert doc.headers["Cache-Control"].startswith("private")

    overlay = client.get(f"{API}/{job_id}/heatmap.png")
    assert overlay.status_code == 200 and overlay.mimetype == "image/png"
    with Image.open(io.BytesIO(overlay.data)) as image:
        assert image.mode == "RGB" and image.width == 64 and image.height > 64
    faint = client.get(f"{API}/{job_id}/heatmap.png?opacity=0.1")
    assert faint.status_code == 200 and faint.data != overlay.data
    bad = client.get(f"{API}/{job_id}/heatmap.png?opacity=3")
    assert bad.status_code == 400 and bad.get_json()["error"] == "invalid_opacity"


def test_the_result_urls_are_the_routes(client: FlaskClient) -> None:
    with client.application.test_request_context():
        for path, endpoint in [
            (HEATMAP_PNG_PATH, "api.get_heatmap_png"),
            (HEATMAP_JSON_PATH, "api.get_heatmap_json"),
            (IMAGE_PNG_PATH, "api.get_image"),
        ]:
            assert url_for(endpoint, job_id="abc") == path.format(id="abc")


def test_results_with_and_without_an_explanation_parse() -> None:
    old = {
        "label": "NORMAL",
        "probabilities": {"NORMAL": 0.9, "PNEUMONIA": 0.1},
        "model_version": 1,
        "batch_size": 1,
        "timings_ms": {"queue": 1, "decode": 1, "batch_wait": 0, "model": 5, "worker_total": 7},
    }
    parsed = PredictionResult.from_dict(old)
    assert parsed.explanation is None and parsed.explanation_reason is None
    assert parsed.timings_ms.explain is None
    new = PredictionResult(
        label="PNEUMONIA",
        probabilities={"NORMAL": 0.2, "PNEUMONIA": 0.8},
        model_version=2,
        decision_threshold=None,
        batch_size=4,
        timings_ms=Timings(1.0, 1.0, 0.0, 9.0, 12.0, explain=0.7),
        explanation=Explanation.for_job("f" * 32, "grad-cam", "block5_conv3", "PNEUMONIA"),
    )
    doc = new.to_dict()
    assert doc["explanation"] == {
        "method": "grad-cam",
        "layer": "block5_conv3",
        "class_explained": "PNEUMONIA",
        "heatmap_url": f"/api/v1/predictions/{'f' * 32}/heatmap.png",
        "map_url": f"/api/v1/predictions/{'f' * 32}/heatmap.json",
    }
    assert PredictionResult.from_json(new.to_json()) == new


RENDER_SCRIPT = """
import io, json, sys
from PIL import Image
from web import create_app
from worker.client import Keys
import redis

app = create_app()
client = app.test_client()
buffer = io.BytesIO()
Image.new("L", (64, 64), 128).save(buffer, "PNG")
response = client.post("/api/v1/predictions",
    data={"file": (io.BytesIO(buffer.getvalue()), "x.png")}, content_type="multipart/form-data")
job_id = response.get_json()["id"]
redis.Redis.from_url(sys.argv[1]).set(Keys(sys.argv[2]).heatmap(job_id), sys.argv[3])
assert client.get(f"/api/v1/predictions/{job_id}/heatmap.png").status_code == 200
"""


def test_the_web_renders_overlays_without_tensorflow(settings: Settings) -> None:
    assert_runs_without_tensorflow(
        RENDER_SCRIPT, settings, settings.redis_url, settings.key_prefix, json.dumps(MAP_DOC)
    )
