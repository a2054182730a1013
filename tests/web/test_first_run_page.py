"""The home page's first-run panel, /readyz's first_run and the untrained-model marks (Flask)."""

from __future__ import annotations

import io
import json
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from flask import Flask
from flask.testing import FlaskClient
from pydantic import SecretStr

from tests.conftest import link_model
from tests.web.conftest import heartbeat, png
from worker.client import Keys
from worker.first_run import FirstRunRecord
from worker.records import PredictionResult, Timings
from worker.settings import Settings

DOCKER_INIT = "docker compose run --rm worker cxr init-model --base imagenet"


def page_of(client: FlaskClient, path: str = "/") -> str:
    response = client.get(path)
    assert response.mimetype == "text/html"
    text = response.get_data(as_text=True)
    assert "`" not in text, "literal backticks on the page"
    return text


def write_first_run(
    redis_client: redis.Redis,
    settings: Settings,
    status: str | None,
    progress: dict[str, Any] | None = None,
    **job: Any,
) -> str:
    """A first-run record that started a job in ``status`` (``None``: no job record)."""
    keys = Keys(settings.key_prefix)
    job_id = uuid.uuid4().hex
    record = FirstRunRecord(
        "started", "the registry is empty", time.time(), job_id=job_id, dataset="chest_xray"
    )
    redis_client.hset(keys.first_run(), mapping=record.to_mapping())  # type: ignore[arg-type]
    if status is not None:
        fields: dict[str, Any] = {"status": status, "created_at": time.time(), "actor": "first-run"}
        fields["params"] = json.dumps({"dataset": "chest_xray"})
        if progress is not None:
            fields["progress"] = json.dumps(progress)
        fields |= {k: json.dumps(v) if isinstance(v, dict) else v for k, v in job.items()}
        redis_client.hset(keys.training_job(job_id), mapping=fields)
    return job_id


RUNNING = {
    "stage": "training", "phase": 1, "epoch": 2, "batch": 5, "batches": 10, "total_epochs": 4,
    "elapsed_seconds": 60.0, "eta_seconds": 150.0, "metrics": {},
}  # fmt: skip


# --- the panel ---------------------------------------------------------------------------------


def test_without_a_model_or_a_first_run_the_page_explains_both_ways(client: FlaskClient) -> None:
    text = page_of(client)
    notice = re.search(r'<p class="notice"[^>]*>(.*?)</p>', text, re.S)
    assert notice is not None
    assert f"<code>{DOCKER_INIT}</code>" in notice.group(1)  # an untrained model by hand
    assert "./data" in notice.group(1)  # or a dataset, and the trainer does it
    assert "<code>docker compose restart trainer</code>" in notice.group(1)
    assert "A first model is being trained" not in text


def test_a_running_first_run_shows_phase_epoch_and_eta(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, "no_model", None)
    write_first_run(redis_client, settings, "running", RUNNING)
    text = page_of(client)
    assert "A first model is being trained" in text
    assert "<code>chest_xray</code>" in text
    assert "phase 1 of 2, epoch 2 of 4, batch 5 of 10" in text
    assert "about 2 min left" in text  # 150 s
    value = re.search(r'<progress max="1" value="([0-9.]+)"', text)
    assert value is not None and float(value.group(1)) == 0.375  # 1.5 of 4 epochs
    assert "No model version is active yet" not in text  # the panel, not the notice


def test_a_queued_or_loading_first_run(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    write_first_run(redis_client, settings, "queued")
    assert "Queued: the trainer starts it in a moment." in page_of(client)
    write_first_run(redis_client, settings, "running", {"stage": "loading dataset"})
    assert "Loading dataset…" in page_of(client)
    write_first_run(redis_client, settings, "done", outcome={"version": 1})
    text = page_of(client)
    assert "The first model is trained" in text and "Version 1 was fine-tuned" in text


def test_a_failed_first_run_says_why_and_how_else(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    write_first_run(redis_client, settings, "failed", error="dataset 'x' has no test split")
    text = page_of(client)
    assert "fine-tuning job failed: dataset &#39;x&#39; has no test split" in text
    assert f"<code>{DOCKER_INIT}</code>" in text


def test_no_dataset_reason_is_shown(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    keys = Keys(settings.key_prefix)
    record = FirstRunRecord("no_dataset", "no dataset in /data: put one there", time.time())
    redis_client.hset(keys.first_run(), mapping=record.to_mapping())  # type: ignore[arg-type]
    text = page_of(client)
    assert "did not start a first run: no dataset in /data: put one there" in text


def test_no_panel_while_a_model_is_served(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, "serving", 1)
    write_first_run(redis_client, settings, "running", RUNNING)
    text = page_of(client)
    assert 'id="first-run"' not in text and "No model version" not in text


def test_an_upload_during_the_first_run_shows_the_panel_once(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, "no_model", None)
    write_first_run(redis_client, settings, "running", RUNNING)
    response = client.post(
        "/", data={"files": [(io.BytesIO(png()), "a.png")]},
        content_type="multipart/form-data",
    )  # fmt: skip
    assert response.status_code == 503
    text = response.get_data(as_text=True)
    assert text.count('id="first-run"') == 1 and "No model version" not in text


# --- /readyz ------------------------------------------------------------------------------------


def test_readyz_reports_the_first_run_without_changing_readiness(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, "no_model", None)
    job_id = write_first_run(redis_client, settings, "running", RUNNING)
    response = client.get("/readyz")
    assert response.status_code == 503
    first_run = response.get_json()["first_run"]
    assert first_run["state"] == "started" and first_run["job_id"] == job_id
    assert first_run["job_status"] == "running" and first_run["progress"]["epoch"] == 2
    heartbeat(redis_client, settings, "serving", 1)
    response = client.get("/readyz")
    assert response.status_code == 200 and response.get_json()["first_run"]["job_id"] == job_id


# --- untrained marks ----------------------------------------------------------------------------


def result(trained: bool) -> PredictionResult:
    return PredictionResult(
        label="PNEUMONIA", probabilities={"NORMAL": 0.4, "PNEUMONIA": 0.6}, model_version=1,
        decision_threshold=None, batch_size=1, timings_ms=Timings(1.0, 1.0, 0.0, 2.0, 4.0),
        model_trained=trained,
    )  # fmt: skip


def test_result_records_carry_model_trained() -> None:
    assert PredictionResult.from_json(result(False).to_json()).model_trained is False
    old = result(True).to_dict()
    del old["model_trained"]
    assert PredictionResult.from_dict(old).model_trained is True  # stored before the field


def test_the_api_answers_model_trained(
    client: FlaskClient, settings: Settings, redis_client: redis.Redis
) -> None:
    job_id = uuid.uuid4().hex
    redis_client.hset(
        Keys(settings.key_prefix).job(job_id),
        mapping={"status": "done", "created_at": time.time(), "finished_at": time.time(),
                 "result": result(False).to_json()},
    )  # fmt: skip
    body = client.get(f"/api/v1/predictions/{job_id}").get_json()
    assert body["result"]["model_trained"] is False


def untrained_registry(settings: Settings, tiny_model_dir: Path, trained: bool) -> None:
    """Version 1 (the tiny model) in the app's registry, active, marked ``trained``."""
    shutil.copytree(tiny_model_dir / "1", settings.model_dir / "1", copy_function=link_model)
    meta_path = settings.model_dir / "1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"trained": trained}))
    (settings.model_dir / "active.json").write_text(json.dumps({"version": 1}))


def test_pages_mark_an_untrained_active_version(
    app: Flask, client: FlaskClient, settings: Settings, tiny_model_dir: Path,
    redis_client: redis.Redis,
) -> None:  # fmt: skip
    heartbeat(redis_client, settings, "serving", 1)
    untrained_registry(settings, tiny_model_dir, trained=False)
    marker = "The active model (version 1) was never trained: its answers are not a diagnosis."
    assert marker in page_of(client)
    results = page_of(client, f"/results?id={uuid.uuid4().hex}")
    assert marker in results
    # The per-card mark: untrained.js, loaded before card.js, which calls it for every card.
    assert results.index("untrained.js") < results.index("card.js")
    js = (Path(app.static_folder or "") / "card.js").read_text()
    assert "window.cxrUntrained.mark(card, result)" in js


def test_pages_do_not_mark_a_trained_active_version(
    client: FlaskClient, settings: Settings, tiny_model_dir: Path, redis_client: redis.Redis
) -> None:
    heartbeat(redis_client, settings, "serving", 1)
    untrained_registry(settings, tiny_model_dir, trained=True)
    assert "never trained" not in page_of(client)
    assert "never trained" not in page_of(client, f"/results?id={uuid.uuid4().hex}")


def test_the_admin_api_lists_trained(
    settings: Settings, tiny_model_dir: Path, redis_url: str
) -> None:
    from web import create_app

    untrained_registry(settings, tiny_model_dir, trained=False)
    token = "first-run-test-admin-token"
    with_token = settings.model_copy(update={"admin_token": SecretStr(token)})
    admin = create_app({"TESTING": True, "CXR_SETTINGS": with_token}).test_client()
    headers = {"Authorization": f"Bearer {token}"}
    doc = admin.get("/api/v1/admin/models", headers=headers).get_json()
    assert doc["versions"][0]["trained"] is False
    assert admin.get("/api/v1/admin/models/1", headers=headers).get_json()["trained"] is False
    js = (Path(__file__).resolve().parents[2] / "web" / "static" / "admin.js").read_text()
    assert '"badge untrained", "UNTRAINED"' in js
