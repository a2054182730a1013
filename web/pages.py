"""HTML pages: the upload form and the result page that polls the JSON API."""

from __future__ import annotations

import re

from flask import Blueprint, Response, redirect, render_template, request, url_for
from markupsafe import Markup, escape
from werkzeug.wrappers import Response as BaseResponse

from web import metrics, prediction_client
from web.api import image_error_status, read_upload
from worker.client import NO_MODEL_MESSAGE, ImageError, NoModelError, QueueFullError, is_job_id

bp = Blueprint("pages", __name__)

OOD_TEXT = "Not recognised as a frontal chest X-ray — no prediction"
CODE_SPAN = re.compile(r"`([^`\n]+)`")


@bp.app_template_filter("code_spans")
def code_spans(text: str) -> Markup:
    """``text`` as HTML, escaped, with every `backtick-quoted` span set as ``<code>``."""
    # Messages shared with the JSON API (e.g. NO_MODEL_MESSAGE) mark commands with backticks;
    # the spans are found after escaping, so their content is escaped like the rest.
    return Markup(CODE_SPAN.sub(r"<code>\1</code>", str(escape(text))))


def no_model_message() -> str | None:
    """Return the no-model message when the live workers say they have nothing to serve."""
    workers = prediction_client().workers()
    if workers and all(w.state in ("no_model", "error") for w in workers):
        return NO_MODEL_MESSAGE
    return None


@bp.get("/")
def index() -> str:
    """The upload form."""
    return render_template("index.html", notice=no_model_message(), errors=[], accepted=[])


@bp.post("/")
def upload() -> BaseResponse | tuple[str, int] | tuple[str, int, dict[str, str]]:
    """Queue every uploaded file; show the results page, or the form again with what failed."""
    files = [f for f in request.files.getlist("files") if f.filename or f.content_length]
    if not files:
        return render_template(
            "index.html", notice=None, errors=[("", "Choose at least one X-ray.")], accepted=[]
        ), 400
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
            return render_template("index.html", notice=str(exc), errors=[], accepted=[]), 503
        except QueueFullError as exc:
            metrics.rejected("queue_full")
            page = render_template("index.html", notice=str(exc), errors=[], accepted=accepted)
            return page, 503, {"Retry-After": str(exc.retry_after)}
    if not errors:
        return redirect(url_for("pages.results", id=[job for _, job in accepted]), code=303)
    return render_template("index.html", notice=None, errors=errors, accepted=accepted), status


@bp.get("/results")
def results() -> Response | tuple[str, int]:
    """A card per job id that polls the API until the prediction is there."""
    ids = [i for i in request.args.getlist("id") if is_job_id(i)][:50]
    if not ids:
        return render_template(
            "index.html", notice=None, errors=[("", "No prediction ids given.")], accepted=[]
        ), 404
    # Results already there are rendered by the server too (a page without JavaScript, or
    # reloaded after the jobs finished, still says what happened).
    done = {}
    for job_id in ids:
        doc = prediction_client().status(job_id)
        if doc is not None and doc.get("status") == "done":
            done[job_id] = doc
    return Response(render_template("results.html", ids=ids, done=done, ood_text=OOD_TEXT))
