"""The gate in the service: a real worker refuses, ``?ood=ignore`` and the admin switch work.

Version 1 is the session's tiny model with a hand-made gate whose threshold is below every
score (so every image is refused): the mechanics, not the detector, are under test here
(tests/ml/test_ood.py tests the detector).
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from PIL import Image

from ml.ood import OOD_FILE, REASON, MahalanobisGate
from tests.conftest import WorkerProcess, link_model, make_settings, start_worker, wait_for
from worker.settings import Settings

pytestmark = pytest.mark.integration
TOKEN = "ood-gate-test-token-9f3a2c71"


@pytest.fixture(scope="module")
def gated(
    redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, WorkerProcess]]:
    root = tmp_path_factory.mktemp("gated")
    shutil.copytree(tiny_model_dir, root / "models", copy_function=link_model)
    # features of the tiny model are 512-d pooled VGG16 features; a negative threshold refuses all
    gate = MahalanobisGate(
        np.zeros((2, 512), np.float32), np.eye(512, dtype=np.float32), -1.0, 0.99
    )
    gate.save(root / "models" / "1" / OOD_FILE)
    meta_path = root / "models" / "1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    summary = {"method": "mahalanobis", "threshold": -1.0, "val_acceptance": 0.0}
    meta["ood"] = {**summary, "test_acceptance": 0.0, "target_acceptance": 0.99}
    meta_path.write_text(json.dumps(meta))
    settings = make_settings(redis_url, root / "models", admin_token=TOKEN)
    worker = start_worker(settings, root, concurrency=1)
    try:
        wait_for(lambda: worker.serving(1), 90, "the gated worker to serve")
    except AssertionError:
        worker.stop()
        raise AssertionError(worker.log()[-4000:]) from None
    yield settings, worker
    worker.stop()


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def predict(app: Flask, query: str = "", form: dict[str, str] | None = None) -> dict[str, Any]:
    client = app.test_client()
    data: dict[str, Any] = {"file": (io.BytesIO(png()), "grey.png"), **(form or {})}
    response = client.post("/api/v1/predictions" + query, data=data)
    assert response.status_code == 202, response.get_json()
    doc = client.get(response.headers["Location"] + "?wait=30").get_json()
    assert doc["status"] == "done", doc
    result: dict[str, Any] = doc["result"]
    return result


@pytest.fixture(scope="module")
def app(gated: tuple[Settings, WorkerProcess]) -> Flask:
    from web import create_app

    return create_app({"TESTING": True, "CXR_SETTINGS": gated[0]})


def test_refused_image_is_done_with_label_null_and_probabilities_kept(app: Flask) -> None:
    result = predict(app)
    assert result["label"] is None
    ood = result["out_of_distribution"]
    assert ood["reason"] == REASON and ood["method"] == "mahalanobis"
    assert ood["score"] > ood["threshold"] == -1.0
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert result["gate"] == "mahalanobis" and result["ood_ignored"] is False


def test_ood_ignore_by_query_or_form_gives_the_raw_answer(app: Flask) -> None:
    for query, form in (("?ood=ignore", None), ("", {"ood": "ignore"})):
        result = predict(app, query, form)
        assert result["label"] in ("NORMAL", "PNEUMONIA")
        assert result["out_of_distribution"] is None
        assert result["ood_ignored"] is True and result["gate"] == "ignored"
    bad = app.test_client().post(
        "/api/v1/predictions?ood=maybe", data={"file": (io.BytesIO(png()), "g.png")}
    )
    assert bad.status_code == 400


def test_admin_turns_a_versions_gate_off_and_on(app: Flask) -> None:
    client = app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    row = client.get("/api/v1/admin/models", headers=auth).get_json()["versions"][0]
    assert row["gate"]["method"] == "mahalanobis" and row["gate"]["enabled"] is True
    off = client.put("/api/v1/admin/models/1/gate", json={"enabled": False}, headers=auth)
    assert off.status_code == 200, off.get_json()
    assert off.get_json()["gate"]["enabled"] is False
    try:
        result = predict(app)
        assert result["label"] is not None and result["gate"] == "off"
    finally:
        client.put("/api/v1/admin/models/1/gate", json={"enabled": True}, headers=auth)
    assert predict(app)["label"] is None
    assert (
        client.put("/api/v1/admin/models/9/gate", json={"enabled": False}, headers=auth).status_code
        == 404
    )
    assert (
        client.put("/api/v1/admin/models/1/gate", json={"enabled": "no"}, headers=auth).status_code
        == 400
    )


def test_results_page_says_not_recognised(app: Flask) -> None:
    client = app.test_client()
    response = client.post("/api/v1/predictions", data={"file": (io.BytesIO(png()), "g.png")})
    job = response.get_json()["id"]
    client.get(response.headers["Location"] + "?wait=30")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        page = client.get(f"/results?id={job}").get_data(as_text=True)
        if "refused" in page:
            break
        time.sleep(0.1)
    assert "Not recognised as a frontal chest X-ray — no prediction" in page
