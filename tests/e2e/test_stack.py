"""The whole stack over HTTP: gunicorn + Redis + a Celery worker, with real chest X-rays."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CLASSES
from tests.e2e.conftest import DATA_DIR, real_xrays

pytestmark = pytest.mark.integration


def poll(url: str, timeout: float = 60) -> dict[str, Any]:
    """GET a status URL until the job is finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc: dict[str, Any] = requests.get(url, timeout=5).json()
        if doc["status"] in ("done", "failed"):
            return doc
        time.sleep(0.05)
    raise AssertionError(f"{url} not finished after {timeout} s")


def test_readyz_reports_the_serving_version(web_url: str) -> None:
    response = requests.get(f"{web_url}/readyz", timeout=5)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["status"] == "ready"
    assert doc["serving"] is True and doc["model_versions"] == [1]
    assert all(w["state"] == "serving" for w in doc["workers"])
    # Issue 9: each process says what it computes in and what chose it.
    for w in doc["workers"]:
        assert w["precision"] in ("float32", "bfloat16", "float16")
        assert w["hardware"]["cpu_model"] and isinstance(w["hardware"]["cpu_bf16_flags"], list)


@pytest.mark.skipif(DATA_DIR is None, reason="CXR_TEST_DATA_DIR is not set (.ci/run sets it)")
def test_real_xrays_through_the_json_api(web_url: str) -> None:
    images = real_xrays(per_class=4)
    assert len(images) >= 8
    status_urls = []
    for path in images:
        with path.open("rb") as f:
            r = requests.post(f"{web_url}/api/v1/predictions", files={"file": f}, timeout=10)
        assert r.status_code == 202, r.text
        assert r.headers["Location"] == r.json()["status_url"]
        status_urls.append(web_url + r.json()["status_url"])
    for path, url in zip(images, status_urls, strict=True):
        doc = poll(url)
        assert doc["status"] == "done", doc
        assert doc["filename"] == path.name
        result = doc["result"]
        assert result["label"] in CLASSES
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert result["model_version"] == 1
        assert result["precision"] in ("float32", "bfloat16", "float16")


@pytest.mark.skipif(DATA_DIR is None, reason="CXR_TEST_DATA_DIR is not set (.ci/run sets it)")
def test_real_xrays_through_the_upload_form(web_url: str) -> None:
    images = real_xrays(per_class=1)
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in images]
    r = requests.post(f"{web_url}/", files=files, timeout=10, allow_redirects=False)
    assert r.status_code == 303
    page = requests.get(web_url + r.headers["Location"], timeout=5)
    assert page.status_code == 200
    ids = re.findall(r'data-job="([0-9a-f]{32})"', page.text)
    assert len(ids) == len(images)
    for job_id in ids:
        assert poll(f"{web_url}/api/v1/predictions/{job_id}")["status"] == "done"


def test_metrics_add_up_over_gunicorn_workers(web_url: str) -> None:
    """Every gunicorn worker's requests appear in one scrape (multiprocess mode)."""

    def healthz_count() -> float:
        text = requests.get(f"{web_url}/metrics", timeout=5).text
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "cxr_http_requests_total" and s.labels.get("route") == "/healthz"
        )

    before = healthz_count()
    for _ in range(20):  # new connections: gunicorn spreads them over its workers
        assert requests.get(f"{web_url}/healthz", timeout=5).ok
    assert healthz_count() - before == 20
