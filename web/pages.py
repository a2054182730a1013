"""HTML pages: the upload form and the results page (rendered as the jobs stand, then kept up to
date from the JSON API by web/static/results.js)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import redis
from flask import Blueprint, Response, current_app, redirect, render_template, request, url_for
from markupsafe import Markup, escape
from werkzeug.wrappers import Response as BaseResponse

from web import extension, metrics, prediction_client
from web.api import explain_requested, image_error_status, read_upload
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


@bp.app_context_processor
def static_helpers() -> dict[str, Any]:
    """``static_exists(name)``: whether the app serves ``/static/<name>`` (optional scripts)."""

    def static_exists(name: str) -> bool:
        folder = current_app.static_folder
        return folder is not None and (Path(folder) / name).is_file()

    return {"static_exists": static_exists}


def has_route(path: str) -> bool:
    """Whether a GET of ``path`` reaches a view of this app (an endpoint another module adds)."""
    try:
        current_app.url_map.bind("").match(path, method="GET")
    except Exception:  # NotFound, MethodNotAllowed, a redirect: no plain GET view
        return False
    return True


def card_view(job_id: str, doc: dict[str, Any] | None) -> dict[str, Any]:
    """What the results page shows of one job without JavaScript (results.js redraws it)."""
    url = url_for("api.get_prediction", job_id=job_id)
    view: dict[str, Any] = {"id": job_id, "url": url, "doc": doc, "state": "missing"}
    if doc is None:
        return view
    view["state"] = doc["status"]
    result = doc.get("result")
    if doc["status"] != "done" or not result:
        return view
    explanation = result.get("explanation") if result.get("label") is not None else None
    image = f"{url}/image.png"
    view.update(
        result=result,
        refused=result.get("label") is None and bool(result.get("out_of_distribution")),
        ood=result.get("out_of_distribution") or {},
        explanation=explanation,
        image_url=image if has_route(image) else None,
        bars=[(n, float(p) * 100) for n, p in (result.get("probabilities") or {}).items()],
        meta=meta_text(doc),
    )
    return view


def meta_text(doc: dict[str, Any]) -> str:
    """The card's line on the model: version, decision rule, time (as card.js writes it)."""
    result = doc["result"]
    threshold = result.get("decision_threshold")
    rule = (
        "decision: the most probable class (no threshold)"
        if threshold is None
        else f"screening threshold: a finding when 1 − p(NORMAL) ≥ {threshold:.3f}"
    )
    elapsed = doc.get("elapsed_ms")
    seconds = f"{elapsed / 1000:.2f} s" if elapsed is not None else "?"
    model = (result.get("timings_ms") or {}).get("model")
    explain = (result.get("timings_ms") or {}).get("explain")
    gradcam = f", Grad-CAM {explain:.0f} ms" if explain is not None else ""
    timing = f" (model {model:.0f} ms{gradcam})" if model is not None else ""
    return (
        f"Model version {result.get('model_version')} · {rule} · "
        f"{seconds} from upload to result{timing}"
        + (" · out-of-distribution gate ignored on request" if result.get("ood_ignored") else "")
    )


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
    explain = explain_requested()
    for storage in files:
        name = storage.filename or "upload"
        try:
            job_id = prediction_client().submit(read_upload(storage), name, explain=explain)
            accepted.append((name, job_id))
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
    """A card per job id as it stands; reloading (or results.js) shows the ones still running."""
    ids = [i for i in request.args.getlist("id") if is_job_id(i)][:50]
    if not ids:
        return form_page(errors=[("", "No prediction ids given.")]), 404
    client = prediction_client()
    cards = [card_view(i, client.status(i)) for i in ids]
    pending = any(c["state"] in ("queued", "running") for c in cards)
    return Response(
        render_template(
            "results.html", cards=cards, pending=pending, untrained_version=untrained_version()
        )
    )
