"""The admin surface: a bearer-token JSON API (``/api/v1/admin``) and the page that uses it.

The API starts fine-tuning jobs and moves the active-version pointer; the page (``/admin``) holds
no data itself, it asks for the token and calls the API from the browser. With no
``CXR_ADMIN_TOKEN`` configured every admin route answers 403: disabled, never open.
"""

from __future__ import annotations

import hmac
import json
import re
from typing import Any

from flask import (
    Blueprint,
    Response,
    jsonify,
    render_template,
    request,
    send_file,
    url_for,
)
from pydantic import ValidationError

from web import extension, settings
from web.api import accepted, error_response
from web.openapi import Operation, declare
from web.openapi import Reply as Answer
from web.schemas import (
    MAX_LIMIT,
    MAX_REASON_CHARS,
    AuditList,
    CardQuery,
    EvalDatasetBody,
    EvalDatasetList,
    GateChange,
    GateChanged,
    JobList,
    ListQuery,
    ModelDetail,
    ModelList,
    PointerChange,
    PointerChanged,
    TrainingAccepted,
    TrainingJob,
)
from worker.catalog import ModelCatalog, VersionNotFoundError, render_card
from worker.evalsets import EvalDatasetError, EvalDatasets, check_eval_name, check_eval_path
from worker.jobs import FINAL_JOB_STATES, TrainingJobs, TrainingRequest, form_fields
from worker.registry import ActiveVersion, PointerError

bp = Blueprint("admin", __name__, url_prefix="/api/v1/admin")
pages_bp = Blueprint("admin_pages", __name__)

ACTOR = "admin"
MAX_ACTOR_CHARS = 64
MAX_JSON_BYTES = 64 * 1024  # an admin request body is a few hundred bytes of JSON
# What may follow "admin:" in an audit entry: a name or an e-mail address, nothing that could
# forge another log line or hide in a terminal (no control characters, no newlines).
_ACTOR_CHARS = re.compile(r"[^A-Za-z0-9 ._@+-]")
# The training knobs the page's form offers (the rest keep their defaults); limits, defaults and
# labels come from their declaration, ml.config.TrainingOptions.
FORM_KNOBS = (
    "input_size", "epochs_head", "epochs_finetune", "learning_rate_head",
    "learning_rate_finetune", "finetune_blocks", "batch_size", "max_images_per_class",
    "target_sensitivity",
)  # fmt: skip

Reply = Response | tuple[Response, int]


def registry() -> ActiveVersion:
    """The current app's active-version pointer."""
    return extension("cxr_registry", ActiveVersion)


def catalog() -> ModelCatalog:
    """The current app's view of the model versions."""
    return extension("cxr_models", ModelCatalog)


def training_jobs() -> TrainingJobs:
    """The current app's fine-tuning job client."""
    return extension("cxr_jobs", TrainingJobs)


def eval_sets() -> EvalDatasets:
    """The current app's registered evaluation sets."""
    return extension("cxr_eval_sets", EvalDatasets)


def actor() -> str:
    """Who is acting: ``admin``, plus the sanitised ``X-Actor`` header when one is sent."""
    name = _ACTOR_CHARS.sub("", request.headers.get("X-Actor", "")).strip()
    name = " ".join(name.split())[:MAX_ACTOR_CHARS].strip()
    return f"{ACTOR}:{name}" if name else ACTOR


@bp.before_request
def require_token() -> Reply | None:
    """Refuse every admin route unless the request carries the configured bearer token."""
    secret = settings().admin_token
    if secret is None or not secret.get_secret_value():
        return error_response(403, "admin_disabled", "set CXR_ADMIN_TOKEN to enable the admin API")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # compare_digest on bytes: constant time, and no TypeError on non-ASCII input.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), secret.get_secret_value().encode()
    ):
        response, status = error_response(
            401, "unauthorized", "missing or wrong admin token (Authorization: Bearer <token>)"
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        return response, status
    return None


@bp.before_request
def bound_the_body() -> Reply | None:
    """Refuse an admin request body over MAX_JSON_BYTES (413) before reading it."""
    if (request.content_length or 0) > MAX_JSON_BYTES:
        return error_response(
            413,
            "too_large",
            f"the request body is {request.content_length:,} bytes; admin requests are JSON of "
            f"at most {MAX_JSON_BYTES // 1024} KiB",
        )
    return None


@bp.after_request
def no_store(response: Response) -> Response:
    """Authenticated answers must not be kept by shared or browser caches."""
    response.headers["Cache-Control"] = "no-store"
    return response


# --- request helpers --------------------------------------------------------------------------


class InvalidRequest(ValueError):
    """A request body or query string the admin API cannot use."""

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.details = details or []


class BodyTooLarge(ValueError):
    """A chunked admin request body that grew past MAX_JSON_BYTES."""


@bp.errorhandler(BodyTooLarge)
def body_too_large(exc: BodyTooLarge) -> Reply:
    """Answer 413 for a body over the bound."""
    return error_response(
        413, "too_large", f"admin requests are JSON of at most {MAX_JSON_BYTES // 1024} KiB"
    )


@bp.errorhandler(InvalidRequest)
def bad_request(exc: InvalidRequest) -> Reply:
    """Answer 400 ``invalid_request`` with what was wrong."""
    return error_response(400, "invalid_request", str(exc), details=exc.details)


class DatasetNotFound(LookupError):
    """A folder named in a request is not in CXR_DATA_DIR."""


@bp.errorhandler(DatasetNotFound)
def dataset_not_found(exc: DatasetNotFound) -> Reply:
    """Answer 422 ``dataset_not_found`` with which folder and what to name instead."""
    return error_response(422, "dataset_not_found", str(exc))


def check_data_folder(folder: str, missing: str, hint: str, unchecked: str) -> str | None:
    """Check ``folder`` is a directory in CXR_DATA_DIR; raise :class:`DatasetNotFound` if not.

    ``missing`` names it and ``hint`` says what to name in the 422 message. When CXR_DATA_DIR is
    not visible here nothing can be checked: the answer is a warning ending in ``unchecked``
    (what was not checked and who checks it later), else ``None``.
    """
    data_dir = settings().data_dir
    if not data_dir.is_dir():
        # The web process may not mount the data (compose mounts it read-only in both).
        return f"CXR_DATA_DIR ({data_dir}) is not visible to the web process, so {unchecked}"
    if not (data_dir / folder).is_dir():
        raise DatasetNotFound(f"no {missing} in CXR_DATA_DIR ({data_dir}): {hint}")
    return None


def json_body() -> dict[str, Any]:
    """The request's JSON object; an empty body counts as ``{}``."""
    # A chunked body has no Content-Length: read one byte past the bound to see if it is over.
    raw = (
        request.stream.read(MAX_JSON_BYTES + 1)
        if request.content_length is None
        else (request.get_data(cache=True))
    )
    if len(raw) > MAX_JSON_BYTES:
        raise BodyTooLarge()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def query_limit() -> int:
    """The ``limit`` query parameter (``web.schemas.ListQuery``: 1..MAX_LIMIT, default 50)."""
    try:
        return ListQuery.model_validate(request.args.to_dict()).limit
    except ValidationError:
        raw = request.args.get("limit")
        raise InvalidRequest(
            f"limit must be an integer from 1 to {MAX_LIMIT}, got {raw!r}"
        ) from None


def reason() -> str:
    """The optional ``reason`` of a pointer change (``web.schemas.PointerChange``)."""
    body = json_body()
    unknown = sorted(set(body) - set(PointerChange.model_fields))
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}")
    try:
        change = PointerChange.model_validate(body, strict=True)
    except ValidationError:
        raise InvalidRequest(
            f"reason must be a string of at most {MAX_REASON_CHARS} characters"
        ) from None
    return change.reason.strip()


def not_found(what: str) -> Reply:
    """Answer 404 with the JSON error document."""
    return error_response(404, "not_found", what)


# --- what each route takes and answers (web.openapi builds the document from these) ----------

JOB_ID = {"job_id": "the `id` of the fine-tuning job"}
VERSION = {"version": "a model version number"}
INVALID = "The body or query string is invalid (`invalid_request`, with `details`)."
POINTER_CHANGED = Answer("The new active version and the audit entry.", PointerChanged)
CHANGE_POINTER = Operation(
    body=PointerChange,
    parameters=VERSION,
    responses={200: POINTER_CHANGED, 400: INVALID, 404: "No such version (`not_found`)."},
)
CREATE_JOB = Operation(
    body=TrainingRequest,
    responses={
        202: Answer(
            "Queued; follow `status_url`.",
            TrainingAccepted,
            headers={"Location": "The job's URL."},
        ),
        400: INVALID,
        409: "`base` is `active` and no version is active (`no_active_version`).",
        422: "The dataset is not in CXR_DATA_DIR (`dataset_not_found`).",
    },
)
LIST_JOBS = Operation(
    query=ListQuery, responses={200: Answer("Newest first.", JobList), 400: INVALID}
)
GET_JOB = Operation(
    parameters=JOB_ID,
    responses={200: Answer("The job.", TrainingJob), 404: "No such job (`not_found`)."},
)
CANCEL_JOB = Operation(
    parameters=JOB_ID,
    responses={
        202: Answer("Cancelled (queued), or asked to stop (running).", TrainingJob),
        404: "No such job (`not_found`).",
        409: "Already finished (`not_cancellable`, with its `status`).",
    },
)
LIST_MODELS = Operation(responses={200: Answer("Every version, newest first.", ModelList)})
GET_MODEL = Operation(
    parameters=VERSION,
    responses={
        200: Answer("The version.", ModelDetail),
        404: "No such version, or unreadable (`not_found`).",
    },
)
GET_CURVES = Operation(
    parameters=VERSION,
    redis=False,
    responses={
        200: Answer("The training curves.", media_type="image/png"),
        404: "No such version, or it has no curves (`not_found`).",
    },
)
GET_CARD = Operation(
    query=CardQuery,
    parameters=VERSION,
    responses={
        200: Answer(
            "The model card (Mitchell et al. 2019): JSON, or Markdown / HTML with `format`.",
            {"type": "object"},
            also=("text/markdown", "text/html"),
        ),
        400: INVALID,
        404: "No such version, or unreadable (`not_found`).",
    },
)
SET_GATE = Operation(
    body=GateChange,
    body_required=True,
    parameters=VERSION,
    responses={
        200: Answer("The version's gate now.", GateChanged),
        400: INVALID,
        404: "No such version (`not_found`).",
    },
)
ROLLBACK = Operation(
    body=PointerChange,
    responses={
        200: POINTER_CHANGED,
        400: INVALID,
        409: "There is no previous version (`no_previous_version`).",
    },
)
LIST_AUDIT = Operation(
    query=ListQuery, responses={200: Answer("Newest first.", AuditList), 400: INVALID}
)


# --- fine-tuning jobs ---------------------------------------------------------------------------


@bp.post("/training-jobs")
@declare(CREATE_JOB)
def create_training_job() -> Reply:
    """Queue a fine-tuning job; answer 202 with where to follow it."""
    try:
        params = TrainingRequest.model_validate(json_body())
    except ValidationError as exc:
        details = [
            {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False)
        ]
        raise InvalidRequest(f"{exc.error_count()} invalid field(s)", details) from None
    if params.base == "active" and registry().get() is None:
        return error_response(
            409, "no_active_version", "base 'active' needs an active model version; there is none"
        )
    warning = check_data_folder(
        params.dataset,
        missing=f"dataset {params.dataset!r}",
        hint="name a folder there in the Kaggle layout <split>/<CLASS>/*",
        unchecked="the dataset was not checked; the trainer checks it when the job starts",
    )
    job_id = training_jobs().submit(params, actor())
    status_url = url_for("admin.get_training_job", job_id=job_id)
    body: TrainingAccepted = {"id": job_id, "status": "queued", "status_url": status_url}
    if warning:
        body["warning"] = warning
    return accepted(body, status_url)


@bp.get("/training-jobs")
@declare(LIST_JOBS)
def list_training_jobs() -> Reply:
    """The most recent fine-tuning jobs, newest first."""
    return jsonify({"jobs": training_jobs().list(query_limit())})


@bp.get("/training-jobs/<job_id>")
@declare(GET_JOB)
def get_training_job(job_id: str) -> Reply:
    """One fine-tuning job: parameters, status, progress, outcome."""
    doc = training_jobs().get(job_id)
    if doc is None:
        return not_found(f"no training job with id {job_id!r}")
    return jsonify(doc)


@bp.delete("/training-jobs/<job_id>")
@declare(CANCEL_JOB)
def cancel_training_job(job_id: str) -> Reply:
    """Cancel a queued job at once, or ask a running one to stop at its next batch."""
    jobs = training_jobs()
    doc = jobs.get(job_id)
    if doc is None:
        return not_found(f"no training job with id {job_id!r}")
    if doc["status"] in FINAL_JOB_STATES:
        # Built by hand: error_response's own first parameter is called ``status``.
        body = {
            "error": "not_cancellable",
            "message": f"the job is already {doc['status']}",
            "status": doc["status"],
        }
        return jsonify(body), 409
    cancelled = jobs.cancel(job_id)
    if cancelled is None:  # deleted in between
        return not_found(f"no training job with id {job_id!r}")
    return jsonify(cancelled), 202


# --- model versions and the active pointer ------------------------------------------------------


@bp.get("/models")
@declare(LIST_MODELS)
def list_models() -> Reply:
    """Every model version, newest first, and which one is active."""
    active = registry().get()
    models = catalog()
    rows = [row for v in models.versions() if (row := models.summary(v, active)) is not None]
    return jsonify({"active_version": active, "versions": rows})


@bp.get("/models/<int:version>")
@declare(GET_MODEL)
def get_model(version: int) -> Reply:
    """Everything known about one version, with its evaluation."""
    try:
        doc = catalog().detail(version)
    except VersionNotFoundError:
        return not_found(f"no model version {version}")
    except (OSError, ValueError, TypeError) as exc:  # the list skips such a version too
        return not_found(f"model version {version} cannot be read: {exc}")
    doc["active"] = registry().get() == version
    return jsonify(doc)


@bp.get("/models/<int:version>/curves.png")
@declare(GET_CURVES)
def get_curves(version: int) -> Reply:
    """The training curves of one version (PNG)."""
    path = catalog().curves(version)
    if path is None:
        return not_found(f"model version {version} has no training curves")
    return send_file(path, mimetype="image/png", max_age=0)


@bp.get("/models/<int:version>/card")
@declare(GET_CARD)
def get_model_card(version: int) -> Reply:
    """The model card of one version: JSON, or ``?format=markdown`` / ``?format=html``."""
    try:
        fmt = CardQuery.model_validate(request.args.to_dict()).format
    except ValidationError:
        raw = request.args.get("format", "")
        raise InvalidRequest(f"format must be json, markdown or html, got {raw[:40]!r}") from None
    try:
        card = catalog().card(version, registry().audit(MAX_LIMIT))
    except VersionNotFoundError:
        return not_found(f"no model version {version}")
    except (OSError, ValueError, TypeError) as exc:
        return not_found(f"model version {version} cannot be read: {exc}")
    if fmt == "markdown":
        return Response(render_card(card, "markdown"), mimetype="text/markdown")
    if fmt == "html":
        return Response(render_card(card, "html"), mimetype="text/html")
    return jsonify(card)


@bp.put("/models/<int:version>/gate")
@declare(SET_GATE)
def set_model_gate(version: int) -> Reply:
    """Turn a version's out-of-distribution gate on or off: ``{"enabled": bool, "reason"?}``."""
    body = json_body()
    unknown = sorted(set(body) - set(GateChange.model_fields))
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}")
    if not isinstance(body.get("enabled"), bool):
        raise InvalidRequest("enabled must be true or false")
    try:
        change = GateChange.model_validate(body, strict=True)
    except ValidationError:
        raise InvalidRequest(
            f"reason must be a string of at most {MAX_REASON_CHARS} characters"
        ) from None
    try:
        catalog().set_gate(version, change.enabled, actor(), change.reason.strip())
    except VersionNotFoundError:
        return not_found(f"no model version {version}")
    doc = catalog().detail(version)
    return jsonify({"version": version, "gate": doc["gate"]})


def change_pointer(version: int, action: str) -> Reply:
    """Make ``version`` active (``promote`` or ``pin``) and answer with the audit entry."""
    why = reason()
    if not catalog().has(version):
        return not_found(f"no model version {version}")
    try:
        entry = registry().set(version, actor=actor(), action=action, reason=why)
    except PointerError as exc:  # the folder went away between the check and the change
        return not_found(str(exc))
    return jsonify({"active_version": entry.to_version, "audit": entry.to_dict()})


@bp.post("/models/<int:version>/promote")
@declare(CHANGE_POINTER)
def promote_model(version: int) -> Reply:
    """Make ``version`` the one every worker serves."""
    return change_pointer(version, "promote")


@bp.post("/models/<int:version>/pin")
@declare(CHANGE_POINTER)
def pin_model(version: int) -> Reply:
    """Deliberately make a specific (usually older) version active."""
    return change_pointer(version, "pin")


@bp.post("/models/rollback")
@declare(ROLLBACK)
def rollback_model() -> Reply:
    """Make the previously active version active again."""
    why = reason()
    try:
        entry = registry().rollback(actor=actor(), reason=why)
    except PointerError as exc:
        return error_response(409, "no_previous_version", str(exc))
    return jsonify({"active_version": entry.to_version, "audit": entry.to_dict()})


@bp.get("/audit")
@declare(LIST_AUDIT)
def list_audit() -> Reply:
    """The most recent changes of the active version, newest first."""
    return jsonify({"entries": registry().audit(query_limit())})


# --- evaluation sets -----------------------------------------------------------------------------


EVAL_NAME = {"name": "the evaluation set's name"}
LIST_EVAL_SETS = Operation(
    redis=True,
    responses={200: Answer("The registered evaluation sets.", EvalDatasetList)},
)
REGISTER_EVAL_SET = Operation(
    body=EvalDatasetBody,
    body_required=True,
    parameters=EVAL_NAME,
    responses={
        200: "Moved: the set's record (with `warning` when the path could not be checked).",
        201: "Registered: the set's record (with `warning` when the path could not be checked).",
        400: INVALID,
        409: "The name belongs to a CXR_EVAL_DATASETS set, or too many sets are registered.",
        422: "No such folder in CXR_DATA_DIR (`dataset_not_found`).",
    },
)
REMOVE_EVAL_SET = Operation(
    parameters=EVAL_NAME,
    responses={
        204: "Removed (the evaluations stored with versions stay).",
        404: "No such set registered through the admin API (`not_found`).",
        409: "The set comes from CXR_EVAL_DATASETS, not the admin API.",
    },
)


@bp.get("/eval-datasets")
@declare(LIST_EVAL_SETS)
def list_eval_datasets() -> Reply:
    """The registered evaluation sets (CXR_EVAL_DATASETS and the admin API's), by name."""
    return jsonify({"datasets": eval_sets().list()})


@bp.put("/eval-datasets/<name>")
@declare(REGISTER_EVAL_SET)
def register_eval_dataset(name: str) -> Reply:
    """Register (or move) an evaluation set ``{"path": "<folder inside CXR_DATA_DIR>"}``."""
    body = json_body()
    unknown = sorted(set(body) - {"path"})
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}")
    try:
        check_eval_name(name)
        path = check_eval_path(body.get("path"))
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    warning = check_data_folder(
        path,
        missing=f"folder {path!r}",
        hint="name one holding <CLASS>/<images> or test/<CLASS>/<images>",
        unchecked="the path was not checked; a set the trainer cannot read is recorded as an "
        "error with each version",
    )
    sets = eval_sets()
    existed = any(row["name"] == name for row in sets.list())
    try:
        doc = sets.register(name, path, actor())
    except EvalDatasetError as exc:
        return error_response(409, exc.code, str(exc))
    response = jsonify(doc | ({"warning": warning} if warning else {}))
    response.status_code = 200 if existed else 201
    return response


@bp.delete("/eval-datasets/<name>")
@declare(REMOVE_EVAL_SET)
def remove_eval_dataset(name: str) -> Reply:
    """Forget an evaluation set; the evaluations stored with versions stay."""
    try:
        removed = eval_sets().remove(name)
    except EvalDatasetError as exc:
        return error_response(409, exc.code, str(exc))
    if not removed:
        return not_found(f"no evaluation set {name!r} registered through the admin API")
    return Response(status=204)


# --- the page -------------------------------------------------------------------------------------


@pages_bp.get("/admin")
def admin_page() -> str:
    """The admin page: a token prompt and the script that drives the admin API."""
    api_root = url_for("admin.list_models").removesuffix("/models")
    return render_template("admin.html", api_root=api_root, knobs=form_fields(FORM_KNOBS))
