"""The model registry's versions as the admin API shows them: list rows, details, curves.

TF-free: metadata, evaluations and curves are read from ``MODEL_DIR`` with :mod:`ml.versions`'s
readers (JSON and files only), so the web process reaches the registry through here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from typing_extensions import TypedDict  # pydantic needs this one on Python 3.11

from ml.external import read_external, sensitivity_warning
from ml.model_card import build_card, card_html, card_markdown
from ml.ood import read_gate_off, set_gate_off
from ml.versions import (
    ModelMetadata,
    VersionNotFoundError,
    curves_path,
    has_version,
    list_versions,
    read_evaluation,
    read_metadata,
    version_dir,
)

__all__ = ["GateSummary", "ModelCatalog", "ModelDetail", "VersionNotFoundError", "render_card"]

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("accuracy", "sensitivity", "specificity", "roc_auc")
EXTERNAL_SUMMARY = (
    "n", "accuracy", "sensitivity", "sensitivity_ci", "specificity", "roc_auc", "roc_auc_ci",
    "threshold", "target_sensitivity", "error", "warning",
)  # fmt: skip


class GateSummary(TypedDict):
    """A version's out-of-distribution gate as the admin API shows it (ml.ood)."""

    method: str  # mahalanobis, or none (the version has no gate)
    threshold: float | None
    val_acceptance: float | None
    test_acceptance: float | None
    enabled: bool  # it has a gate and nobody turned it off
    turned_off: dict[str, Any] | None  # who turned it off, when and why (gate-off.json)


def render_card(card: dict[str, Any], fmt: Literal["markdown", "html"]) -> str:
    """A model card (:meth:`ModelCatalog.card`) as Markdown or a self-contained HTML page."""
    return card_markdown(card) if fmt == "markdown" else card_html(card)


@dataclass(frozen=True)
class ModelDetail(ModelMetadata):
    """One version as the admin API shows it: its metadata, evaluation, curves, whether active.

    The answer's schema (``web.openapi``): :meth:`ModelCatalog.detail` adds these keys to
    ``ModelMetadata.to_dict()``, so a new metadata field is in the schema at once.
    """

    evaluation: dict[str, Any] | None = None
    has_curves: bool = False
    active: bool = False
    gate: GateSummary | None = None


class ModelCatalog:
    """Reads the versions of one model folder for display."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir

    def versions(self) -> list[int]:
        """Every version number, newest first."""
        return sorted(list_versions(self.model_dir), reverse=True)

    def has(self, version: int) -> bool:
        """Whether ``version`` exists."""
        return has_version(self.model_dir, version)

    def untrained(self, version: int) -> bool:
        """Whether ``version`` exists and was never trained (its answers are marked so)."""
        try:
            return not read_metadata(self.model_dir, version).trained
        except (VersionNotFoundError, OSError, ValueError, TypeError):
            return False

    def curves(self, version: int) -> Path | None:
        """The training curves PNG of ``version``, if it exists and has one."""
        return curves_path(self.model_dir, version) if self.has(version) else None

    def summary(self, version: int, active: int | None) -> dict[str, Any] | None:
        """One row of the versions list, or ``None`` when the version cannot be read."""
        try:
            meta = read_metadata(self.model_dir, version)
        except (VersionNotFoundError, OSError, ValueError, TypeError) as exc:
            # A half-deleted or hand-edited folder should not take the whole list down.
            log.warning("skipping model version %s: %s", version, exc)
            return None
        return {
            "version": meta.version,
            "created_at": meta.created_at,
            "parent_version": meta.parent_version,
            "base_weights": meta.base_weights,
            "input_size": meta.input_size,
            "class_names": meta.class_names,
            "metrics": {k: meta.metrics[k] for k in SUMMARY_METRICS if k in meta.metrics},
            "training_seconds": meta.training_seconds,
            "job_id": meta.job_id,
            "decision_threshold": meta.decision_threshold,
            "trained": meta.trained,
            "active": version == active,
            "has_curves": curves_path(self.model_dir, version) is not None,
            "external": {
                name: {k: doc[k] for k in EXTERNAL_SUMMARY if k in doc}
                for name, doc in self.external(version, meta.hyperparameters).items()
            },
            "gate": self.gate(version, meta.ood),
        }

    def external(
        self, version: int, hyperparameters: dict[str, Any] | None = None
    ) -> dict[str, dict[str, Any]]:
        """The version's external evaluations by set, each with its ``warning`` (or None).

        The target is the one the evaluation recorded, else the version's
        ``target_sensitivity`` hyperparameter (what its threshold was chosen for).
        """
        target = (hyperparameters or {}).get("target_sensitivity")
        out = {}
        for name, doc in read_external(self.model_dir, version).items():
            goal = doc.get("target_sensitivity")
            doc["warning"] = sensitivity_warning(
                {"dataset": name, **doc}, goal if goal is not None else target
            )
            out[name] = doc
        return out

    def gate(self, version: int, ood: dict[str, Any]) -> GateSummary:
        """The versions table's gate column: method, threshold, acceptance on val and test."""
        method = ood.get("method", "none") if ood else "none"
        off = read_gate_off(version_dir(self.model_dir, version))
        return {
            "method": method,
            "threshold": ood.get("threshold"),
            "val_acceptance": ood.get("val_acceptance"),
            "test_acceptance": ood.get("test_acceptance"),
            "enabled": method != "none" and off is None,
            "turned_off": off,
        }

    def card(self, version: int, audit: list[dict[str, Any]]) -> dict[str, Any]:
        """The model card of ``version`` (ml.model_card), with the audit entries passed in."""
        meta = read_metadata(self.model_dir, version)
        return build_card(meta.to_dict(), read_evaluation(self.model_dir, version), audit)

    def set_gate(self, version: int, enabled: bool, actor: str, reason: str) -> None:
        """Turn ``version``'s gate on or off (a marker file in its folder the workers check)."""
        if not has_version(self.model_dir, version):
            raise VersionNotFoundError(f"no model version {version}")
        set_gate_off(version_dir(self.model_dir, version), not enabled, actor, reason)

    def detail(self, version: int) -> dict[str, Any]:
        """Everything known about one version, with its evaluation (``active`` is the caller's).

        Raises:
            VersionNotFoundError: there is no such version.
            OSError, ValueError, TypeError: its metadata cannot be read.
        """
        doc = read_metadata(self.model_dir, version).to_dict()
        doc["evaluation"] = read_evaluation(self.model_dir, version)
        doc["external"] = self.external(version, doc.get("hyperparameters"))
        doc["has_curves"] = curves_path(self.model_dir, version) is not None
        doc["gate"] = self.gate(version, doc.get("ood") or {})
        return doc
