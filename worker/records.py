"""The records a prediction job leaves in Redis, typed once for the writer and the reader.

:class:`PredictionResult` is what a worker (``worker.runtime``) stores in a job's ``result``
field; :class:`PredictionStatus` is a job's public state as ``worker.client`` reads it back and
the API answers it. Standard library only (TF-free).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

__all__ = [
    "FINAL_STATES",
    "HEATMAP_JSON_PATH",
    "HEATMAP_PNG_PATH",
    "IMAGE_PNG_PATH",
    "Explanation",
    "GateState",
    "JobState",
    "OutOfDistribution",
    "PredictionResult",
    "PredictionStatus",
    "Timings",
]

JobState = Literal["queued", "running", "done", "failed"]
# mahalanobis: the version's gate ran; none: the version has none; off: turned off (version or
# deployment); ignored: the request asked ?ood=ignore.
GateState = Literal["mahalanobis", "none", "off", "ignored"]
FINAL_STATES: frozenset[str] = frozenset({"done", "failed"})

# Where the web serves a result's images and map (web/api.py routes them; a test checks).
HEATMAP_PNG_PATH = "/api/v1/predictions/{id}/heatmap.png"
HEATMAP_JSON_PATH = "/api/v1/predictions/{id}/heatmap.json"
IMAGE_PNG_PATH = "/api/v1/predictions/{id}/image.png"


@dataclass(frozen=True)
class Timings:
    """Where one prediction's time went, in milliseconds (``queue`` unknown: ``None``)."""

    queue: float | None
    decode: float
    batch_wait: float
    model: float
    worker_total: float
    explain: float | None = None  # the batch's Grad-CAM pass; None when no image asked for one


@dataclass(frozen=True)
class Explanation:
    """What the Grad-CAM map of a result explains and where to get it."""

    method: str  # "grad-cam"
    layer: str  # the convolutional layer it comes from, e.g. "block5_conv3"
    class_explained: str  # the reported label
    heatmap_url: str  # the overlay PNG
    map_url: str  # the normalised map as JSON

    @classmethod
    def for_job(cls, job_id: str, method: str, layer: str, class_explained: str) -> Explanation:
        """The explanation of job ``job_id``, with the URLs the web serves it under."""
        return cls(
            method=method,
            layer=layer,
            class_explained=class_explained,
            heatmap_url=HEATMAP_PNG_PATH.format(id=job_id),
            map_url=HEATMAP_JSON_PATH.format(id=job_id),
        )


@dataclass(frozen=True)
class OutOfDistribution:
    """The out-of-distribution gate's verdict on an image it refused (ml.ood)."""

    score: float  # the image's Mahalanobis distance (squared) to the nearest class
    threshold: float  # the version's threshold: scores above it are refused
    reason: str  # "not recognised as a frontal chest X-ray"
    method: str  # "mahalanobis"


@dataclass(frozen=True)
class PredictionResult:
    """The answer for one image: label, probabilities and which model gave them, how fast."""

    label: str | None  # None: refused by the out-of-distribution gate
    probabilities: dict[str, float]
    model_version: int | None
    decision_threshold: float | None
    batch_size: int
    timings_ms: Timings
    precision: str = "float32"  # what the model computed in; the probabilities are float32
    # The gate's verdict when it refused the image (then label is None); else None.
    out_of_distribution: OutOfDistribution | None = None
    gate: GateState = "none"  # which gate applied (GateState)
    ood_ignored: bool = False  # the request asked ?ood=ignore
    explanation: Explanation | None = None  # the Grad-CAM map; None: see explanation_reason
    explanation_reason: str | None = None  # why there is no explanation (off, failed, no conv)
    # False: the version was never fine-tuned (ml.versions.ModelMetadata.trained): its label
    # is not a diagnosis, and every page showing it says so.
    model_trained: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The JSON-native form (the API's ``result`` object)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Serialise for the job hash's ``result`` field."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PredictionResult:
        """Parse what :meth:`to_dict` wrote."""
        timings = data["timings_ms"]
        fields = {f.name: timings.get(f.name) for f in dataclasses.fields(Timings)}
        return cls(
            label=data.get("label"),
            probabilities=dict(data["probabilities"]),
            model_version=data["model_version"],
            decision_threshold=data.get("decision_threshold"),
            batch_size=data["batch_size"],
            timings_ms=Timings(**fields),
            precision=data.get("precision", "float32"),
            out_of_distribution=_refusal(data.get("out_of_distribution")),
            gate=cast(GateState, data.get("gate", "none")),
            ood_ignored=bool(data.get("ood_ignored", False)),
            # Records written before explanations existed have neither field.
            explanation=_explanation(data.get("explanation")),
            explanation_reason=data.get("explanation_reason"),
            # Results stored before the field existed came from versions taken as trained.
            model_trained=bool(data.get("model_trained", True)),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> PredictionResult:
        """Parse a job hash's ``result`` field."""
        return cls.from_dict(json.loads(raw))


def _refusal(data: Mapping[str, Any] | None) -> OutOfDistribution | None:
    """Parse a stored refusal, ignoring fields this version does not know."""
    if not data:
        return None
    return OutOfDistribution(
        **{f.name: data[f.name] for f in dataclasses.fields(OutOfDistribution)}
    )


def _explanation(data: Mapping[str, Any] | None) -> Explanation | None:
    """Parse a stored explanation, ignoring fields this version does not know."""
    if not data:
        return None
    return Explanation(**{f.name: data[f.name] for f in dataclasses.fields(Explanation)})


@dataclass(frozen=True)
class PredictionStatus:
    """The public state of one prediction job (the API's ``GET /api/v1/predictions/<id>``)."""

    id: str
    status: JobState
    created_at: float | None
    filename: str | None = None
    elapsed_ms: float | None = None
    result: PredictionResult | None = None
    error: str | None = None

    @classmethod
    def from_hash(cls, job_id: str, job: Mapping[str, str]) -> PredictionStatus:
        """Read a job hash (decoded to text) as the worker and the web process wrote it."""
        created = float(job["created_at"]) if "created_at" in job else None
        elapsed = None
        if created is not None and "finished_at" in job:
            elapsed = round((float(job["finished_at"]) - created) * 1000, 2)
        return cls(
            id=job_id,
            status=cast(JobState, job.get("status", "queued")),
            created_at=created,
            filename=job.get("filename") or None,
            elapsed_ms=elapsed,
            result=PredictionResult.from_json(job["result"]) if "result" in job else None,
            error=job.get("error"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The API's JSON document: fields that are unknown are left out, ``created_at`` kept."""
        doc: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.filename:
            doc["filename"] = self.filename
        doc["created_at"] = self.created_at
        if self.elapsed_ms is not None:
            doc["elapsed_ms"] = self.elapsed_ms
        if self.result is not None:
            doc["result"] = self.result.to_dict()
        if self.error is not None:
            doc["error"] = self.error
        return doc
