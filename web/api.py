"""JSON API: ``/api/v1/predictions`` to submit an X-ray and poll for its result."""

from __future__ import annotations

from typing import Any

import redis
from flask import Blueprint, Flask, Response, jsonify, render_template, request, url_for
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from web import metrics, prediction_client, settings
from web.uploads import too_large_message
from worker.client import (
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    NoModelError,
    QueueFullError,
    UnsupportedImageError,
    UnsupportedModalityError,
)

bp = Blueprint("api", __name__, url_prefix="/api/v1")

# Longest a status request may be held open; below the Redis client's socket timeout.
MAX_WAIT_SECONDS = 20.0

# The HTTP status for each kind of refused upload (the first class that matches wins).
IMAGE_ERROR_STATUS: dict[type[ImageError], int] = {
    EmptyImageError: 400,
    CorruptImageError: 400,  # also a malformed or truncated DICOM
    UnsupportedModalityError: 415,  # a DICOM that is not a projection X-ray (CT, MR, ...)
    UnsupportedImageError: 415,  # also a DICOM without pixel data or in an unsupported syntax
    ImageTooLargeError: 413,
}


def error_response(status: int, code: str, message: str, **extra: Any) -> tuple[Response, int]:
    """Return the JSON error document every API error uses."""
    return jsonify({"error": code, "message": message, **extra}), status


def image_error_status(exc: ImageError) -> int:
    """Return the HTTP status for a refused image."""
    return next((s for cls, s in IMAGE_ERROR_STATUS.items() if isinstance(exc, cls)), 400)


def read_upload(storage: FileStorage | None) -> bytes:
    """Return the bytes of a multipart file field, raising EmptyImageError when there are none."""
    data = storage.read() if storage is not None else b""
    if not data:
        raise EmptyImageError("the upload is empty: send the X-ray as the multipart field 'file'")
    return data


@bp.post("/predictions")
def create_prediction() -> tuple[Response, int] | Response:
    """Validate an uploaded X-ray and queue it; answer 202 with where to poll."""
    if "file" not in request.files:
        metrics.rejected("missing_file")
        return error_response(
            400, "missing_file", "send the X-ray as a multipart/form-data field named 'file'"
        )
    storage = request.files["file"]
    ood = request.args.get("ood") or request.form.get("ood") or "apply"
    if ood not in ("apply", "ignore"):
        return error_response(
            400, "invalid_request", f"ood must be 'apply' or 'ignore', got {ood[:40]!r}"
        )
    try:
        job_id = prediction_client().submit(
            read_upload(storage), storage.filename, ood_ignore=ood == "ignore"
        )
    except ImageError as exc:
        metrics.rejected(exc.code)
        return error_response(image_error_status(exc), exc.code, str(exc))
    except NoModelError as exc:
        metrics.rejected("no_model")
        return error_response(503, "no_model", str(exc))
    except QueueFullError as exc:
        metrics.rejected("queue_full")
        response, status = error_response(503, "queue_full", str(exc))
        response.headers["Retry-After"] = str(exc.retry_after)
        return response, status
    status_url = url_for("api.get_prediction", job_id=job_id)
    response = jsonify({"id": job_id, "status": "queued", "status_url": status_url})
    response.status_code = 202
    response.headers["Location"] = status_url
    return response


@bp.get("/predictions/<job_id>")
def get_prediction(job_id: str) -> tuple[Response, int] | Response:
    """Return the state of a prediction: queued, running, done (with result) or failed.

    ``?wait=S`` (up to MAX_WAIT_SECONDS) holds the answer until the job finishes or S seconds
    pass, so a client needs one request rather than a polling loop.
    """
    try:
        wait = min(float(request.args.get("wait", 0)), MAX_WAIT_SECONDS)
    except ValueError:
        return error_response(400, "invalid_wait", "wait must be a number of seconds")
    doc = prediction_client().status(job_id, wait=max(0.0, wait))
    if doc is None:
        ttl = settings().result_ttl_seconds
        return error_response(
            404,
            "not_found",
            f"no prediction with id {job_id!r}: it was never issued, or it finished more than "
            f"{ttl} s ago and has expired",
        )
    return jsonify(doc)


def register_error_handlers(app: Flask) -> None:
    """Answer API errors (and oversized uploads anywhere) as JSON, not HTML."""

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc: RequestEntityTooLarge) -> tuple[Response | str, int]:
        metrics.rejected("too_large")
        limit = settings().max_upload_mb
        message = too_large_message(exc, request.content_length, limit)
        if request.path.startswith("/api/"):
            return error_response(413, "too_large", message)
        page = render_template("index.html", notice=None, errors=[("", message)], accepted=[])
        return page, 413

    @app.errorhandler(redis.RedisError)
    def redis_down(exc: redis.RedisError) -> tuple[Response, int]:
        app.logger.error("Redis error: %s", exc)
        return error_response(503, "unavailable", "the queue is unreachable; try again shortly")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int] | HTTPException:
        if not request.path.startswith("/api/"):
            return exc
        code = (exc.name or "error").lower().replace(" ", "_")
        response, status = error_response(exc.code or 500, code, exc.description or code)
        # Keep what the exception says beyond its body, e.g. the Allow header of a 405.
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response, status
