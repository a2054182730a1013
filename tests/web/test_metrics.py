"""The web process's Prometheus metrics after a few known requests."""

from __future__ import annotations

import io

from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from tests.web.conftest import gif, png


def scrape(client: FlaskClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and index every sample by name and sorted labels."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    out = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def http(method: str, route: str, status: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The key of one request counter sample."""
    labels = (("method", method), ("route", route), ("status", status))
    return "cxr_http_requests_total", labels


def test_requests_and_rejections_are_counted(client: FlaskClient) -> None:
    submit = http("POST", "/api/v1/predictions", "202")
    refused = http("POST", "/api/v1/predictions", "415")
    poll = http("GET", "/api/v1/predictions/<job_id>", "200")
    gif_reason = ("cxr_upload_rejections_total", (("reason", "unsupported_format"),))
    empty_reason = ("cxr_upload_rejections_total", (("reason", "empty"),))
    before = scrape(client)

    for _ in range(3):
        r = client.post("/api/v1/predictions", data={"file": (io.BytesIO(png()), "a.png")})
        assert r.status_code == 202
        assert client.get(r.headers["Location"]).status_code == 200
    for _ in range(2):
        r = client.post("/api/v1/predictions", data={"file": (io.BytesIO(gif()), "a.gif")})
        assert r.status_code == 415
    client.post("/api/v1/predictions", data={"file": (io.BytesIO(b""), "e.png")})

    after = scrape(client)
    assert after[submit] - before.get(submit, 0) == 3
    assert after[poll] - before.get(poll, 0) == 3
    assert after[refused] - before.get(refused, 0) == 2
    assert after[gif_reason] - before.get(gif_reason, 0) == 2
    assert after[empty_reason] - before.get(empty_reason, 0) == 1
    duration = ("cxr_http_request_seconds_count", (("route", "/api/v1/predictions"),))
    assert after[duration] - before.get(duration, 0) == 6
    # The scrape itself is not counted, and ids never become labels.
    assert not any("/metrics" in str(labels) for _, labels in after)
