"""Liveness and readiness endpoints."""

from __future__ import annotations

import redis
from flask import Blueprint, Response, jsonify

from web import prediction_client

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """The process is alive (no dependency is checked)."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Redis is reachable (200, else 503); also reports what every live worker serves."""
    client = prediction_client()
    try:
        client.redis.ping()
        workers = client.workers()
    except redis.RedisError as exc:
        return jsonify({"status": "unavailable", "redis": f"unreachable: {exc}"}), 503
    versions = sorted({w.model_version for w in workers if w.model_version is not None})
    return jsonify(
        {
            "status": "ready",
            "redis": "ok",
            "serving": bool(versions),
            "model_versions": versions,
            "workers": [
                {
                    "name": w.name,
                    "state": w.state,
                    "model_version": w.model_version,
                    "precision": w.precision,
                    "hardware": w.hardware,
                    "error": w.error,
                }
                for w in workers
            ],
        }
    ), 200
