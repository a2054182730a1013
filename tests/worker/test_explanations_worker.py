"""Grad-CAM through real workers: results carry an explanation, the endpoints serve it, and
explain=0 (per request, per deployment) leaves none; a batch may mix both."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from flask import Flask
from PIL import Image

from tests.conftest import WorkerProcess, make_settings, start_worker, wait_for
from tests.worker.test_integration import assert_well_formed, job_status, png_bytes, poll
from worker.app import create_celery
from worker.client import Keys, PredictionClient

pytestmark = pytest.mark.integration

API = "/api/v1/predictions"


def test_a_prediction_is_explained_and_served(live_app: Flask, live_worker: WorkerProcess) -> None:
    client = live_app.test_client()
    response = client.post(API, data={"file": (io.BytesIO(png_bytes(7, size=60)), "a.png")})
    job_id = response.get_json()["id"]
    doc = poll(lambda: client.get(f"{API}/{job_id}").get_json())
    assert doc["status"] == "done", doc
    result = doc["result"]
    assert_well_formed(result)
    assert result["explanation"] == {
        "method": "grad-cam",
        "layer": "block5_conv3",
        "class_explained": result["label"],
        "heatmap_url": f"{API}/{job_id}/heatmap.png",
        "map_url": f"{API}/{job_id}/heatmap.json",
    }
    assert result["explanation_reason"] is None
    assert result["timings_ms"]["explain"] >= 0

    data = client.get(result["explanation"]["map_url"])
    assert data.status_code == 200 and data.is_json
    map_doc = data.get_json()
    assert map_doc["shape"] == [2, 2]  # block5_conv3 of the 32 px test model
    values = [v for row in map_doc["values"] for v in row]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert map_doc["class_explained"] == result["label"]

    overlay = client.get(result["explanation"]["heatmap_url"])
    assert overlay.status_code == 200 and overlay.mimetype == "image/png"
    image = client.get(f"{API}/{job_id}/image.png")
    assert image.status_code == 200 and image.mimetype == "image/png"
    with Image.open(io.BytesIO(overlay.data)) as o, Image.open(io.BytesIO(image.data)) as i:
        assert i.size == (60, 60) and o.width == 60 and o.height > 60


def test_explain_0_gives_null_and_no_map(live_app: Flask, live_worker: WorkerProcess) -> None:
    client = live_app.test_client()
    response = client.post(f"{API}?explain=0", data={"file": (io.BytesIO(png_bytes(8)), "b.png")})
    job_id = response.get_json()["id"]
    doc = poll(lambda: client.get(f"{API}/{job_id}").get_json())
    assert doc["status"] == "done", doc
    assert doc["result"]["explanation"] is None
    assert "explain=0" in doc["result"]["explanation_reason"]
    keys = Keys(live_worker.settings.key_prefix)
    assert not live_worker.redis.exists(keys.heatmap(job_id))
    assert client.get(f"{API}/{job_id}/heatmap.png").status_code == 404
    assert client.get(f"{API}/{job_id}/heatmap.json").status_code == 404
    assert client.get(f"{API}/{job_id}/image.png").status_code == 200  # the image stays


@pytest.mark.parametrize("deployment", [True, False])
def test_one_batch_mixes_explained_and_plain_predictions(
    deployment: bool, redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        redis_url, tiny_model_dir, batch_max_size=8, batch_max_delay_ms=200, explain=deployment
    )
    worker = start_worker(settings, tmp_path, concurrency=8, pool="threads", name="mixed")
    try:
        wait_for(lambda: worker.serving(1), 90, "the worker to serve")
        import redis

        client = PredictionClient(
            settings, redis.Redis.from_url(settings.redis_url), create_celery(settings)
        )
        wanted = [i % 2 == 0 for i in range(8)]
        ids = [
            client.submit(png_bytes(200 + i), f"{i}.png", explain=w) for i, w in enumerate(wanted)
        ]
        for job_id in ids:
            wait_for(lambda j=job_id: job_status(settings, j)["status"] == "done", 60, "a result")
        results = [job_status(settings, j)["result"] for j in ids]
        assert max(r["batch_size"] for r in results) > 1
        for w, r in zip(wanted, results, strict=True):
            if w and deployment:
                assert r["explanation"]["class_explained"] == r["label"]
            else:
                assert r["explanation"] is None
                reason = "CXR_EXPLAIN=0" if not deployment else "explain=0"
                assert reason in r["explanation_reason"]
    finally:
        worker.stop()
