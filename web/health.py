"""Liveness and readiness endpoints."""

from __future__ import annotations

import redis
from flask import Blueprint, Response, jsonify

from web import prediction_client
from web.first_run import first_run_status
from web.openapi import Operation, Reply, declare
from web.schemas import Health, Readiness

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@declare(
    Operation(responses={200: Reply("The process answers.", Health)}, tag="health", redis=False)
)
def healthz() -> Response:
    """The process is alive (no dependency is checked): compose's web healthcheck."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@declare(
    Operation(
        responses={
            200: Reply("Ready: a live worker serves a model.", Readiness),
            503: Reply(
                "Not ready: Redis is unreachable, or no live worker serves a model.", Readiness
            ),
        },
        tag="health",
    )
)
def readyz() -> tuple[Response, int]:
    """200 when an upload now would be classified, else 503; the body says why either way.

    Ready means Redis answers and at least one live worker process serves a model version. The
    body lists every live worker with its state, version and last load error, and what the
    trainer decided about the first run (``first_run``: state, reason, job id and its status and
    progress; ``null`` before any trainer started); it does not change readiness.
    """
    client = prediction_client()
    try:
        client.redis.ping()
        workers = client.workers()
        first_run = first_run_status()
    except redis.RedisError as exc:
        return jsonify(
            {
                "status": "unavailable",
                "reason": "Redis is unreachable",
                "redis": f"unreachable: {exc}",
            }
        ), 503
    serving = [w for w in workers if w.state == "serving" and w.model_version is not None]
    versions = sorted({w.model_version for w in serving if w.model_version is not None})
    body: dict[str, object] = {
        "status": "ready" if serving else "unavailable",
        "redis": "ok",
        "serving": bool(serving),
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
        "first_run": first_run,
    }
    if not serving:
        # Uploads would wait in the queue (no worker) or be refused with 503 (no model).
        body["reason"] = (
            "no live worker process" if not workers else "no live worker process serves a model"
        )
    return jsonify(body), 200 if serving else 503
