"""Prometheus metrics of the web process, served at ``GET /metrics``.

Under gunicorn every worker process writes its samples into ``PROMETHEUS_MULTIPROC_DIR`` (set by
``web/gunicorn_conf.py`` before the app is imported) and any of them serves the sum.
"""

from __future__ import annotations

import os
import time

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter(
    "cxr_http_requests_total",
    "HTTP requests by route, method and status.",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "cxr_http_request_seconds",
    "HTTP request duration by route.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
REJECTED_UPLOADS = Counter(
    "cxr_upload_rejections_total", "Uploads refused before queueing, by reason.", ["reason"]
)

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    """The Prometheus exposition of this web deployment."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def instrument(app: Flask) -> None:
    """Count and time every request by its route pattern (not its URL: ids would explode)."""

    @app.before_request
    def _start() -> None:
        g.cxr_started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        if route != "/metrics":
            REQUESTS.labels(route, request.method, str(response.status_code)).inc()
            started = g.get("cxr_started")
            if started is not None:
                LATENCY.labels(route).observe(time.perf_counter() - started)
        return response

    app.register_blueprint(bp)


def rejected(reason: str) -> None:
    """Count one upload refused for ``reason`` (an ImageError code, or too_large, no_model)."""
    REJECTED_UPLOADS.labels(reason).inc()
