"""HTML pages: the upload form and the result page that polls the JSON API."""

from __future__ import annotations

import re

import redis
from flask import Blueprint, Response, redirect, render_template, request, url_for
from markupsafe import Markup, escape
from werkzeug.wrappers import Response as BaseResponse

from web import extension, metrics, prediction_client
from web.api import image_error_status, read_upload
from web.first_run import panel as first_run_panel
from worker.catalog import ModelCatalog
from worker.client import NO_MODEL_MESSAGE, ImageError, NoModelError, QueueFullError, is_job_id
from worker.registry import ActiveVersion

bp = Blueprint("pages", __name__)

CODE_SPAN = re.compile(r"`([^`\n]+)`")


@bp.app_template_filter("code_spans")
def code_spans(text: str) -> Markup:
    """``text`` as HTML, escaped, with every `backtick-quoted` span set as ``<code>``."""
    # Messages shared with the JSON API (e.g. NO_MODEL_MESSAGE) mark commands with backticks;
    # the spans are found after escaping, so their content is escaped like the rest.
    return Markup(CODE_SPAN.sub(r"<code>\1</code>", str(escape(text))))


def untrained_version() -> int | None:
    """The active version's number when it was never trained (its answers are marked), else None."""
    try:
        active = extension("cxr_registry", ActiveVersion).get()
    except redis.RedisError:
        return None
    if active is None or not extension("cxr_models", ModelCatalog).untrained(active):
        return None
    return active


def form_page(status_notice: str | None = None, **context: object) -> str:
    """The upload form with the first-run panel (web.first_run) while no model is served."""
    first_run = first_run_panel()
    return render_template(
        "index.html",
        first_run=first_run,
        no_model_message=NO_MODEL_MESSAGE,
        untrained_version=untrained_version(),
        notice=None if first_run and status_notice == NO_MODEL_MESSAGE else status_notice,
        **({"errors": [], "accepted": []} | context),
    )


@bp.get("/")
def index() -> str:
    """The upload form."""
    return form_page()


@bp.post("/")
def upload() -> BaseResponse | tuple[str, int] | tuple[str, int, dict[str, str]]:
    """Queue every uploaded file; show the results page, or the form again with what failed."""
    files = [f for f in request.files.getlist("files") if f.filename or f.content_length]
    if not files:
        return form_page(errors=[("", "Choose at least one X-ray.")]), 400
    accepted: list[tuple[str, str]] = []
    errors: list[tuple[str, str]] = []
    status = 200
    for storage in files:
        name = storage.filename or "upload"
        try:
            accepted.append((name, prediction_client().submit(read_upload(storage), name)))
        except ImageError as exc:
            metrics.rejected(exc.code)
            errors.append((name, str(exc)))
            status = image_error_status(exc)
        except NoModelError as exc:
            metrics.rejected("no_model")
            return form_page(str(exc)), 503
        except QueueFullError as exc:
            metrics.rejected("queue_full")
            page = form_page(str(exc), accepted=accepted)
            return page, 503, {"Retry-After": str(exc.retry_after)}
    if not errors:
        return redirect(url_for("pages.results", id=[job for _, job in accepted]), code=303)
    return form_page(errors=errors, accepted=accepted), status


@bp.get("/results")
def results() -> Response | tuple[str, int]:
    """A card per job id that polls the API until the prediction is there."""
    ids = [i for i in request.args.getlist("id") if is_job_id(i)][:50]
    if not ids:
        return form_page(errors=[("", "No prediction ids given.")]), 404
    return Response(render_template("results.html", ids=ids, untrained_version=untrained_version()))
