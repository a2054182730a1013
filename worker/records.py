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

__all__ = ["FINAL_STATES", "JobState", "PredictionResult", "PredictionStatus", "Timings"]

JobState = Literal["queued", "running", "done", "failed"]
FINAL_STATES: frozenset[str] = frozenset({"done", "failed"})


@dataclass(frozen=True)
class Timings:
    """Where one prediction's time went, in milliseconds (``queue`` unknown: ``None``)."""

    queue: float | None
    decode: float
    batch_wait: float
    model: float
    worker_total: float


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
    # The gate's verdict when it refused the image: {score, threshold, reason, method}; else None.
    out_of_distribution: dict[str, Any] | None = None
    # mahalanobis: the version's gate ran; none: the version has none; off: turned off (version or
    # deployment); ignored: the request asked ?ood=ignore (then ood_ignored is true).
    gate: str = "none"
    ood_ignored: bool = False

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
            out_of_distribution=data.get("out_of_distribution"),
            gate=data.get("gate", "none"),
            ood_ignored=bool(data.get("ood_ignored", False)),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> PredictionResult:
        """Parse a job hash's ``result`` field."""
        return cls.from_dict(json.loads(raw))


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
