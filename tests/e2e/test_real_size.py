"""Real-size X-rays through gunicorn, Redis and a real Celery worker (issue 7's "done when")."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import requests

from tests.conftest import CLASSES
from tests.e2e.test_stack import poll
from tests.realsize import jpeg_xray, png16_xray, png_of_size
from worker.settings import Settings

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("600kb.jpg", lambda _limit: jpeg_xray(1600, 1300)),
        ("1mb.jpg", lambda _limit: jpeg_xray(2100, 1700)),
        ("2500px-16bit.png", lambda _limit: png16_xray(2500, 2048)),
        ("1mib-under-the-limit.png", lambda limit: png_of_size(limit - MiB)),
    ],
)
def test_real_size_xray_is_classified_end_to_end(
    name: str, make: Callable[[int], bytes], web_url: str, worker_settings: Settings
) -> None:
    data = make(int(worker_settings.max_upload_mb * MiB))
    r = requests.post(f"{web_url}/api/v1/predictions", files={"file": (name, data)}, timeout=60)
    assert r.status_code == 202, r.text
    doc = poll(web_url + r.json()["status_url"], timeout=90)
    assert doc["status"] == "done", doc
    assert doc["filename"] == name
    assert doc["result"]["label"] in CLASSES
    # The worker decoded the bounded PNG the web stored, not the multi-megabyte file.
    assert doc["result"]["timings_ms"]["decode"] < 1000


def test_over_the_limit_is_refused_over_http_with_the_true_limit(
    web_url: str, worker_settings: Settings
) -> None:
    limit = int(worker_settings.max_upload_mb * MiB)
    r = requests.post(
        f"{web_url}/api/v1/predictions",
        files={"file": ("huge.png", png_of_size(limit + 1))},
        timeout=60,
    )
    assert r.status_code == 413, r.text
    assert f"above the {worker_settings.max_upload_mb:g} MiB limit" in r.json()["message"]


def test_real_size_xrays_through_the_form_over_http(web_url: str) -> None:
    files = [
        ("files", ("a.jpg", jpeg_xray(2500, 2048), "image/jpeg")),
        ("files", ("b.png", png16_xray(2500, 2048), "image/png")),
    ]
    r = requests.post(f"{web_url}/", files=files, timeout=60, allow_redirects=False)
    assert r.status_code == 303, r.text
    page = requests.get(web_url + r.headers["Location"], timeout=10)
    ids = re.findall(r'data-job="([0-9a-f]{32})"', page.text)
    assert len(ids) == 2
    for job_id in ids:
        assert poll(f"{web_url}/api/v1/predictions/{job_id}", timeout=90)["status"] == "done"
