"""JSON API: ``/api/v1/predictions`` to submit an X-ray and poll for its result, its image and
its Grad-CAM map."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import redis
from flask import Blueprint, Flask, Response, jsonify, render_template, request, url_for
from pydantic import BaseModel, Field, ValidationError
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from web import metrics, prediction_client, settings
from web.openapi import Operation, Reply, declare
from web.schemas import (
    MAX_WAIT_SECONDS,
    Accepted,
    HeatmapMap,
    OverlayQuery,
    PredictionStatus,
    StatusQuery,
    UploadQuery,
)
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

__all__ = ["MAX_WAIT_SECONDS", "bp", "error_response", "register_error_handlers"]

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


FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def explain_requested() -> bool:
    """The request's ``explain`` flag: a form field (the last value wins: the form sends a
    hidden ``0`` before its checkbox's ``1``), else the query string; on when absent."""
    values = request.form.getlist("explain") or request.args.getlist("explain")
    return not values or values[-1].strip().lower() not in FALSE_WORDS


def ood_requested() -> str | None:
    """The request's ``ood`` (query, else form field; ``apply`` when absent); None: invalid.

    Both places are validated (UploadQuery): a bad value in either is refused, not shadowed.
    """
    try:
        query = UploadQuery.model_validate(request.args.to_dict())
        form = UploadQuery.model_validate(
            {k: request.form[k] for k in ("ood",) if k in request.form}
        )
    except ValidationError:
        return None
    return query.ood if "ood" in request.args else form.ood


def not_found(job_id: str, what: str = "prediction") -> tuple[Response, int]:
    """The 404 of an unknown or expired id (not cached: a map may still be on its way)."""
    ttl = settings().result_ttl_seconds
    response, status = error_response(
        404,
        "not_found",
        f"no {what} for id {job_id!r}: it was never issued, it has none (explain=0, failed or "
        f"still running), or it finished more than {ttl} s ago and has expired"
        if what != "prediction"
        else f"no prediction with id {job_id!r}: it was never issued, or it finished more than "
        f"{ttl} s ago and has expired",
    )
    response.headers["Cache-Control"] = "no-store"
    return response, status


def _cached(response: Response) -> Response:
    # What an id names never changes (the image from the upload on, the map once written) and
    # it is a patient's image: private caches only, for as long as the result lives.
    response.headers["Cache-Control"] = f"private, max-age={settings().result_ttl_seconds}"
    return response


def _stored_png(job_id: str, what: str, data: bytes | None) -> tuple[Response, int] | Response:
    """A job's stored PNG (``what``: image or heatmap), cached; the 404 when there is none."""
    if data is None:
        return not_found(job_id, what)
    return _cached(Response(data, mimetype="image/png"))


def accepted(body: Mapping[str, Any], status_url: str) -> Response:
    """Answer 202 Accepted with ``body``, naming where to follow the job in ``Location``."""
    response = jsonify(body)
    response.status_code = 202
    response.headers["Location"] = status_url
    return response


def read_upload(storage: FileStorage | None) -> bytes:
    """Return the bytes of a multipart file field, raising EmptyImageError when there are none."""
    data = storage.read() if storage is not None else b""
    if not data:
        raise EmptyImageError("the upload is empty: send the X-ray as the multipart field 'file'")
    return data


class Upload(BaseModel):
    """The multipart body of an upload."""

    file: bytes = Field(
        min_length=1,
        description="the X-ray: PNG, JPEG or DICOM",
        json_schema_extra={"format": "binary", "contentMediaType": "application/octet-stream"},
    )
    ood: Literal["apply", "ignore"] | None = Field(
        default=None, description="as the query's `ood` (the query wins when both are sent)"
    )


UPLOAD = Operation(
    query=UploadQuery,
    body=Upload,
    body_kind="multipart",
    body_required=True,
    rate_limited=True,
    responses={
        202: Reply(
            "Queued; poll `status_url`.",
            model=Accepted,
            headers={"Location": "The status URL of the prediction."},
        ),
        400: "No field `file` (`missing_file`), an empty one (`empty`), not an image "
        "(`corrupt`), or `ood` neither `apply` nor `ignore` (`invalid_request`).",
        413: "The request is over CXR_MAX_UPLOAD_MB (`too_large`), or the image over "
        "CXR_MAX_IMAGE_PIXELS (`too_many_pixels`).",
        415: "Not PNG, JPEG or DICOM (`unsupported_format`), or a DICOM that is not a "
        "projection X-ray (`unsupported_modality`).",
        503: Reply(
            "No worker has a model (`no_model`), the queue is full (`queue_full`, with "
            "`Retry-After`), or Redis is unreachable (`unavailable`).",
            headers={"Retry-After": "Seconds after which to try again (`queue_full`)."},
        ),
    },
)
STATUS = Operation(
    query=StatusQuery,
    rate_limited=True,
    parameters={"job_id": "the `id` of the prediction"},
    responses={
        200: Reply("Its state; `result` once `done`, `error` once `failed`.", PredictionStatus),
        400: "`wait` is not a number (`invalid_wait`).",
        404: "Never issued, or expired (`not_found`).",
    },
)


JOB = {"job_id": "the `id` of the prediction"}
GONE = "Never issued, expired, or (for a map) not explained (`not_found`)."
IMAGE = Operation(
    rate_limited=True,
    parameters=JOB,
    responses={
        200: Reply("The X-ray as stored: grayscale PNG, pixels only.", media_type="image/png"),
        404: GONE,
    },
)
OVERLAY = Operation(
    query=OverlayQuery,
    rate_limited=True,
    parameters=JOB,
    responses={
        200: Reply("The Grad-CAM map over the X-ray, with a legend.", media_type="image/png"),
        400: "`opacity` is not a number from 0 to 1 (`invalid_opacity`).",
        404: GONE,
    },
)
MAP = Operation(
    rate_limited=True,
    parameters=JOB,
    responses={200: Reply("The normalised Grad-CAM map as data.", HeatmapMap), 404: GONE},
)


@bp.post("/predictions")
@declare(UPLOAD)
def create_prediction() -> tuple[Response, int] | Response:
    """Validate an uploaded X-ray and queue it; answer 202 with where to poll."""
    if "file" not in request.files:
        metrics.rejected("missing_file")
        return error_response(
            400, "missing_file", "send the X-ray as a multipart/form-data field named 'file'"
        )
    storage = request.files["file"]
    ood = ood_requested()
    if ood is None:
        return error_response(400, "invalid_request", "ood must be 'apply' or 'ignore'")
    try:
        job_id = prediction_client().submit(
            read_upload(storage),
            storage.filename,
            explain=explain_requested(),
            ood_ignore=ood == "ignore",
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
    body: Accepted = {"id": job_id, "status": "queued", "status_url": status_url}
    return accepted(body, status_url)


@bp.get("/predictions/<job_id>")
@declare(STATUS)
def get_prediction(job_id: str) -> tuple[Response, int] | Response:
    """Return the state of a prediction: queued, running, done (with result) or failed.

    ``?wait=S`` (up to MAX_WAIT_SECONDS) holds the answer until the job finishes or S seconds
    pass, so a client needs one request rather than a polling loop.
    """
    try:
        query = StatusQuery.model_validate(request.args.to_dict())
    except ValidationError:
        return error_response(400, "invalid_wait", "wait must be a number of seconds")
    doc = prediction_client().status(job_id, wait=max(0.0, min(query.wait, MAX_WAIT_SECONDS)))
    if doc is None:
        return not_found(job_id)
    return jsonify(doc)


@bp.get("/predictions/<job_id>/image.png")
@declare(IMAGE)
def get_image(job_id: str) -> tuple[Response, int] | Response:
    """The image the prediction was made on: the stored grayscale PNG, pixels only."""
    return _stored_png(job_id, "image", prediction_client().image_png(job_id))


@bp.get("/predictions/<job_id>/heatmap.png")
@declare(OVERLAY)
def get_heatmap_png(job_id: str) -> tuple[Response, int] | Response:
    """The Grad-CAM map over the image, with its legend; ``?opacity=`` 0..1 (default 0.45)."""
    try:
        opacity = OverlayQuery.model_validate(request.args.to_dict()).opacity
    except ValidationError:
        return error_response(400, "invalid_opacity", "opacity must be a number from 0 to 1")
    return _stored_png(job_id, "heatmap", prediction_client().heatmap_png(job_id, opacity))


@bp.get("/predictions/<job_id>/heatmap.json")
@declare(MAP)
def get_heatmap_json(job_id: str) -> tuple[Response, int] | Response:
    """The normalised Grad-CAM map as data: method, layer, class, shape and rows of values."""
    doc = prediction_client().heatmap_map(job_id)
    if doc is None:
        return not_found(job_id, "heatmap")
    return _cached(jsonify({"id": job_id, **doc}))


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
