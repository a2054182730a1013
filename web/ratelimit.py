"""Per-client rate limits on the public endpoints (Flask-Limiter, counted in Redis).

Clients are told apart by their address (``request.remote_addr``): behind a reverse proxy, put
Werkzeug's ``ProxyFix`` in front so that it is the client's and not the proxy's. Counters live in
the deployment's Redis under ``<prefix>:ratelimit``, so every gunicorn process and every web
container shares them. If Redis is down the limiter lets requests through (the request then
meets the outage itself and gets a 503), rather than turning an outage into 500s.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from worker.settings import Settings

# endpoint -> the setting whose value limits it
LIMITED_ENDPOINTS = {
    "api.create_prediction": "rate_limit_uploads",
    "pages.upload": "rate_limit_uploads",
    "api.get_prediction": "rate_limit_status",
    "api.get_image": "rate_limit_status",
    "api.get_heatmap_png": "rate_limit_status",
    "api.get_heatmap_json": "rate_limit_status",
}


def init_rate_limits(app: Flask, settings: Settings) -> Limiter | None:
    """Limit the upload and status endpoints of ``app`` per client; ``None`` when all are off.

    Call after the blueprints are registered: the limits wrap their view functions.
    """
    limits = {e: getattr(settings, name) for e, name in LIMITED_ENDPOINTS.items()}
    if not any(limits.values()):
        return None
    limiter = Limiter(
        key_func=get_remote_address,
        app=app,
        storage_uri=settings.redis_url,
        storage_options={"socket_connect_timeout": 2, "socket_timeout": 5},
        key_prefix=f"{settings.key_prefix}:ratelimit",
        strategy="moving-window",
        headers_enabled=True,
        swallow_errors=True,
        retry_after="delta-seconds",
    )
    for endpoint, value in limits.items():
        if value:
            # One budget per setting: the form and the API draw on the same upload allowance.
            shared = limiter.shared_limit(value, scope=LIMITED_ENDPOINTS[endpoint])
            view: Any = shared(app.view_functions[endpoint])  # a sync view stays sync
            app.view_functions[endpoint] = view
    return limiter
