"""The untrained-model mark on result cards (web/static/untrained.js) in headless Chromium.

gunicorn on its own settings and no worker: the results are written into Redis as a worker
would write them, one from a version never trained and one from a trained version.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import redis
from playwright.sync_api import Page, expect

from tests.conftest import make_settings
from tests.e2e.conftest import gunicorn
from tests.e2e.test_browser import browser, page  # noqa: F401  (fixtures)
from worker.client import Keys
from worker.records import PredictionResult, Timings
from worker.settings import Settings

pytestmark = pytest.mark.integration


def done_job(client: redis.Redis, settings: Settings, trained: bool) -> str:
    job_id = uuid.uuid4().hex
    result = PredictionResult(
        label="PNEUMONIA", probabilities={"NORMAL": 0.3, "PNEUMONIA": 0.7}, model_version=1,
        decision_threshold=None, batch_size=1, timings_ms=Timings(1.0, 1.0, 0.0, 2.0, 4.0),
        model_trained=trained,
    )  # fmt: skip
    now = time.time()
    key = Keys(settings.key_prefix).job(job_id)
    client.hset(
        key,
        mapping={"status": "done", "created_at": now, "finished_at": now,
                 "filename": f"{'trained' if trained else 'untrained'}.png",
                 "result": result.to_json()},
    )  # fmt: skip
    client.expire(key, 120)
    return job_id


def test_a_card_from_an_untrained_version_says_it_is_not_a_diagnosis(
    page: Page,  # noqa: F811
    redis_url: str,
    tmp_path: Path,
) -> None:
    settings = make_settings(redis_url, tmp_path / "models")
    client = redis.Redis.from_url(redis_url)
    untrained, trained = done_job(client, settings, False), done_job(client, settings, True)
    with gunicorn(settings, tmp_path) as url:
        page.goto(f"{url}/results?id={untrained}&id={trained}")
        cards = page.locator(".card[data-job]")
        expect(cards.nth(0).locator(".status")).to_have_text("PNEUMONIA")
        expect(cards.nth(1).locator(".status")).to_have_text("PNEUMONIA")
        mark = cards.nth(0).locator(".untrained-mark")
        expect(mark).to_contain_text("Untrained model — not a diagnosis")
        expect(cards.nth(0)).to_have_class("card untrained")
        expect(cards.nth(1).locator(".untrained-mark")).to_have_count(0)
