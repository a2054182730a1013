"""A flood from one client gets 429/503 while Redis, the worker and other clients carry on."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import requests
from requests.adapters import HTTPAdapter

from tests.conftest import WorkerProcess
from tests.e2e.conftest import gunicorn
from tests.e2e.test_stack import poll
from tests.web.conftest import png
from worker.settings import Settings

pytestmark = pytest.mark.integration

FLOOD_REQUESTS = 240  # bounded in count...
FLOOD_SECONDS = 8.0  # ...and in time


class FromAddress(HTTPAdapter):
    """Connect from a given loopback address (127.0.0.0/8), i.e. as another client."""

    def __init__(self, address: str):
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def session_from(address: str) -> requests.Session:
    """A requests session whose connections come from ``address``."""
    session = requests.Session()
    session.mount("http://", FromAddress(address))
    return session


@pytest.fixture
def limited_url(
    worker_settings: Settings, live_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Settings]]:
    """gunicorn in front of the session's worker, with rate limits and a small queue bound."""
    settings = worker_settings.model_copy(
        update={"rate_limit_uploads": "20/second", "max_queued_predictions": 40}
    )
    with gunicorn(settings, tmp_path_factory.mktemp("flood")) as url:
        yield url, settings


def test_a_flood_is_refused_while_others_are_served(limited_url: tuple[str, Settings]) -> None:
    url, settings = limited_url
    data = png()
    deadline = time.monotonic() + FLOOD_SECONDS
    flooder = session_from("127.0.0.1")

    def flood(_: int) -> tuple[int, str | None]:
        if time.monotonic() > deadline:
            return 0, None
        r = flooder.post(f"{url}/api/v1/predictions", files={"file": ("f.png", data)}, timeout=30)
        return r.status_code, r.json().get("status_url") if r.status_code == 202 else None

    other = session_from("127.0.0.2")
    other_urls: list[str] = []
    with ThreadPoolExecutor(8) as pool:
        flood_results = pool.map(flood, range(FLOOD_REQUESTS))
        for _ in range(5):  # the other client, one upload every 0.5 s during the flood
            r = other.post(f"{url}/api/v1/predictions", files={"file": ("o.png", data)}, timeout=30)
            assert r.status_code == 202, r.text
            other_urls.append(url + r.json()["status_url"])
            time.sleep(0.5)
        results = [res for res in flood_results if res[0]]

    codes = Counter(code for code, _ in results)
    assert codes[429] > 0, codes  # the flood met its limit
    assert set(codes) <= {202, 429, 503}, codes  # refused, never failed
    for status_url in other_urls:
        assert poll(status_url, timeout=60)["status"] == "done"
    for _, status_url in results:
        if status_url:
            assert poll(url + status_url, timeout=90)["status"] == "done"
    assert redis.Redis.from_url(settings.redis_url).ping()
    ready = requests.get(f"{url}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["serving"] is True
