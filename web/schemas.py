"""The shapes of the JSON the web process builds itself: bodies it parses and documents it answers.

Typed once here (pydantic models for request bodies and query strings, ``TypedDict`` for answers)
and used twice: the views build their answers with them (mypy checks the keys), and
``web.openapi`` turns them into the OpenAPI document's schemas. The records that come from the
worker side (``worker.records.PredictionStatus``, ``worker.registry.AuditEntry``,
``worker.client.WorkerInfo``, ``worker.catalog.ModelDetail``) are documented from their own
dataclasses. TF-free.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict  # pydantic needs this one on Python 3.11

from worker.catalog import GateSummary, ModelDetail
from worker.client import DEFAULT_OPACITY
from worker.jobs import JobState as TrainingJobState
from worker.records import PredictionStatus
from worker.registry import AuditEntry

__all__ = [
    "EvalDatasetBody",
    "EvalDatasetList",
    "HeatmapMap",
    "OverlayQuery",
    "MAX_LIMIT",
    "MAX_REASON_CHARS",
    "MAX_WAIT_SECONDS",
    "Accepted",
    "AuditList",
    "CardQuery",
    "GateChange",
    "GateChanged",
    "ErrorDocument",
    "Health",
    "JobList",
    "ListQuery",
    "ModelDetail",
    "ModelList",
    "ModelSummary",
    "PointerChange",
    "PointerChanged",
    "PredictionStatus",
    "Readiness",
    "StatusQuery",
    "TrainingAccepted",
    "TrainingJob",
    "UploadQuery",
    "WorkerState",
]

MAX_WAIT_SECONDS = 20.0
"""Longest a status request may be held open; below the Redis client's socket timeout."""
MAX_REASON_CHARS = 500
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


# --- what clients send --------------------------------------------------------------------------


class UploadQuery(BaseModel):
    """The query string of an upload (``ood`` may also come as a form field)."""

    model_config = ConfigDict(extra="ignore")

    ood: Literal["apply", "ignore"] = Field(
        default="apply",
        description="`ignore`: label the image even if the version's out-of-distribution gate "
        "does not recognise it as a frontal chest X-ray (the result says `ood_ignored`)",
    )


class OverlayQuery(BaseModel):
    """The query string of a prediction's heatmap overlay."""

    model_config = ConfigDict(extra="ignore")

    opacity: float = Field(
        default=DEFAULT_OPACITY,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="how strongly the map covers the X-ray, 0 (not at all) to 1",
    )


class HeatmapMap(TypedDict):
    """A prediction's Grad-CAM map as data (``heatmap.json``): rows of values in [0, 1]."""

    id: str
    method: str
    layer: str
    class_explained: str
    shape: list[int]
    values: list[list[float]]


class StatusQuery(BaseModel):
    """The query string of a prediction's status."""

    model_config = ConfigDict(extra="ignore")

    wait: float = Field(
        default=0.0,
        allow_inf_nan=False,
        description=f"hold the answer until the job is finished or this many seconds passed "
        f"(at most {MAX_WAIT_SECONDS:g}; larger values count as {MAX_WAIT_SECONDS:g}, negative "
        "ones as 0)",
    )


class CardQuery(BaseModel):
    """The query string of a model card."""

    model_config = ConfigDict(extra="ignore")

    format: Literal["json", "markdown", "html"] = Field(
        default="json", description="the card as JSON, Markdown or an HTML page"
    )


class GateChange(BaseModel):
    """The body of a gate switch: on or off, and why."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(description="whether the version's out-of-distribution gate applies")
    reason: str = Field(default="", max_length=MAX_REASON_CHARS, description="kept in the marker")


class GateChanged(TypedDict):
    """A version's gate after a switch."""

    version: int
    gate: GateSummary


class ListQuery(BaseModel):
    """The query string of the admin API's lists."""

    model_config = ConfigDict(extra="ignore")

    limit: int = Field(
        default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="how many entries, newest first"
    )


class EvalDatasetBody(BaseModel):
    """The body of registering an evaluation set."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        min_length=1,
        max_length=255,
        description="a folder in CXR_DATA_DIR holding <CLASS>/<images> or test/<CLASS>/<images>",
    )


class EvalDatasetList(TypedDict):
    """The registered evaluation sets (CXR_EVAL_DATASETS and the admin API's), by name."""

    datasets: list[dict[str, Any]]


class PointerChange(BaseModel):
    """The optional body of promote, pin and rollback."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(
        default="", max_length=MAX_REASON_CHARS, description="why, for the audit log"
    )


# --- what the web answers -----------------------------------------------------------------------


class ErrorDocument(TypedDict):
    """Every error of the API: a stable machine-readable code and a sentence for people."""

    error: str
    message: str
    details: NotRequired[list[dict[str, Any]]]  # 400 invalid_request: pydantic's findings
    status: NotRequired[str]  # 409 not_cancellable: the job's final state


class Accepted(TypedDict):
    """A queued prediction: where to poll for it (also the ``Location`` header)."""

    id: str
    status: Literal["queued"]
    status_url: str


class TrainingAccepted(Accepted):
    """A queued fine-tuning job; ``warning`` when its dataset could not be checked."""

    warning: NotRequired[str]


class TrainingJob(TypedDict):
    """One fine-tuning job as the admin API shows it."""

    id: str
    status: TrainingJobState
    created_at: NotRequired[float]
    started_at: NotRequired[float]
    finished_at: NotRequired[float]
    actor: NotRequired[str]
    error: NotRequired[str]
    params: NotRequired[dict[str, Any]]  # the request's fields, promotion resolved
    progress: NotRequired[dict[str, Any]]  # phase, epoch, batch, metrics, ETA
    outcome: NotRequired[dict[str, Any]]  # version, metrics, promotion decision
    cancel_requested: bool


class JobList(TypedDict):
    """The most recent fine-tuning jobs, newest first."""

    jobs: list[TrainingJob]


class ModelSummary(TypedDict):
    """One row of the versions list."""

    version: int
    created_at: str
    parent_version: int | None
    base_weights: str | None
    input_size: int
    class_names: list[str]
    metrics: dict[str, float]
    training_seconds: float | None
    job_id: str | None
    decision_threshold: float | None
    active: bool
    has_curves: bool
    trained: bool
    gate: GateSummary
    external: NotRequired[dict[str, Any]]  # registered set -> its stored evaluation


class ModelList(TypedDict):
    """Every version, newest first, and which one is active."""

    active_version: int | None
    versions: list[ModelSummary]


class PointerChanged(TypedDict):
    """The pointer after promote, pin or rollback, with the audit entry of the change."""

    active_version: int
    audit: AuditEntry


class AuditList(TypedDict):
    """The most recent changes of the active version, newest first."""

    entries: list[AuditEntry]


class Health(TypedDict):
    """Liveness: the process answers."""

    status: Literal["ok"]


class WorkerState(TypedDict):
    """One live inference process as readiness lists it."""

    name: str
    state: str  # loading, serving, no_model, error
    model_version: int | None
    precision: str | None
    hardware: dict[str, Any] | None
    error: str | None


class Readiness(TypedDict):
    """Readiness: ``ready`` when an upload now would be classified; why not otherwise."""

    status: Literal["ready", "unavailable"]
    redis: str
    reason: NotRequired[str]
    serving: NotRequired[bool]
    model_versions: NotRequired[list[int]]
    workers: NotRequired[list[WorkerState]]
    first_run: NotRequired[dict[str, Any] | None]  # web.first_run.first_run_status
