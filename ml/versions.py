"""The model registry on disk: numbered version folders under ``MODEL_DIR``.

``MODEL_DIR/<N>/`` holds ``model.keras``, ``metadata.json`` and, for trained versions,
``evaluation.json`` and ``curves.png``. A version is written into a hidden staging folder beside
the others and renamed into place, so a reader never sees half a version and a crash mid-write
leaves none behind (only a ``.staging-*`` folder, which is ignored).

``MODEL_DIR/active.json`` records the active version for when the shared pointer (kept in Redis by
the service) is unavailable; it is written atomically too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # TensorFlow is imported only where a model is saved or loaded.
    import keras

    from ml.model import Classifier
    from ml.ood import MahalanobisGate

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
EVALUATION_FILE = "evaluation.json"
CURVES_FILE = "curves.png"
ACTIVE_FILE = "active.json"

PathLike = str | os.PathLike[str]


class VersionNotFoundError(LookupError):
    """The requested version does not exist (or is incomplete)."""


class IncompatibleModelError(ValueError):
    """A model file does not fit the service's input/output convention."""


@dataclass(frozen=True)
class ModelMetadata:
    """What is known about a version besides its weights."""

    version: int
    class_names: list[str]
    input_size: int
    base_weights: str | None
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    parent_version: int | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    training_seconds: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None
    # On 1 - p(negative class); None = argmax. Chosen on the validation split (ml.decision).
    decision_threshold: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The out-of-distribution gate (ml.ood): method, threshold, acceptance on val/test; {} = none.
    ood: dict[str, Any] = field(default_factory=dict)
    # False for a version never fine-tuned (`cxr init-model`: a random or ImageNet base under a
    # fresh head): its answers mean nothing and are marked so wherever they appear.
    trained: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMetadata:
        """Read metadata written by :meth:`to_dict`, ignoring keys it does not know.

        Metadata written before ``trained`` existed gets it from :func:`infer_trained`.
        """
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        if not isinstance(values.get("trained"), bool):
            values["trained"] = infer_trained(
                values.get("extra") or {},
                bool(values.get("metrics")),
                values.get("training_seconds") is not None,
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-native form stored in ``metadata.json``."""
        return asdict(self)


def infer_trained(extra: dict[str, Any], evaluated: bool, timed: bool) -> bool:
    """Whether a version whose metadata does not say was trained.

    ``extra["trained"]`` when present (``cxr init-model`` wrote ``False`` there before the field
    existed); an imported model counts as trained (it was trained elsewhere; ``cxr import
    --untrained`` says otherwise); else a version with an evaluation or a training time was
    trained, one with neither (a bare ``save_version`` of a freshly built model) was not.
    """
    flag = extra.get("trained")
    if isinstance(flag, bool):
        return flag
    return "imported_from" in extra or evaluated or timed


def _is_number(name: str) -> bool:
    return name.isascii() and name.isdigit()


def version_dir(model_dir: PathLike, version: int) -> Path:
    """The folder of one version."""
    return Path(model_dir) / str(version)


def list_versions(model_dir: PathLike) -> list[int]:
    """Return the complete version numbers under ``model_dir``, ascending."""
    root = Path(model_dir)
    if not root.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in root.iterdir()
        if _is_number(p.name) and (p / MODEL_FILE).is_file() and (p / METADATA_FILE).is_file()
    )


def latest_version(model_dir: PathLike) -> int | None:
    """Return the highest version number present, or ``None`` when there is none."""
    versions = list_versions(model_dir)
    return versions[-1] if versions else None


def has_version(model_dir: PathLike, version: int) -> bool:
    """Whether ``version`` exists and is complete."""
    path = version_dir(model_dir, version)
    return (path / MODEL_FILE).is_file() and (path / METADATA_FILE).is_file()


def read_metadata(model_dir: PathLike, version: int) -> ModelMetadata:
    """Read ``metadata.json`` of one version."""
    if not has_version(model_dir, version):
        raise VersionNotFoundError(f"no model version {version} in {model_dir}")
    path = version_dir(model_dir, version) / METADATA_FILE
    return ModelMetadata.from_dict(json.loads(path.read_text()))


def read_evaluation(model_dir: PathLike, version: int) -> dict[str, Any] | None:
    """Read ``evaluation.json`` of one version, or ``None`` when it was never evaluated."""
    path = version_dir(model_dir, version) / EVALUATION_FILE
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def curves_path(model_dir: PathLike, version: int) -> Path | None:
    """The training curves image of one version, if it has one."""
    path = version_dir(model_dir, version) / CURVES_FILE
    return path if path.is_file() else None


def find_version_by_job(model_dir: PathLike, job_id: str) -> int | None:
    """Return the version a training job published, if it published one."""
    for version in list_versions(model_dir):
        if read_metadata(model_dir, version).job_id == job_id:
            return version
    return None


def save_version(
    model: keras.Model,
    model_dir: PathLike,
    *,
    class_names: list[str],
    base_weights: str | None,
    parent_version: int | None = None,
    hyperparameters: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
    training_seconds: float | None = None,
    evaluation: dict[str, Any] | None = None,
    curves_png: bytes | None = None,
    job_id: str | None = None,
    decision_threshold: float | None = None,
    extra: dict[str, Any] | None = None,
    ood_gate: MahalanobisGate | None = None,
    ood: dict[str, Any] | None = None,
    trained: bool | None = None,
) -> ModelMetadata:
    """Publish ``model`` as the next version number under ``model_dir`` and return its metadata.

    ``ood_gate`` is stored as ``ood.npz`` and ``ood`` (its summary, or why there is none) in the
    metadata; a model card (``model_card.md``) is written from the metadata and evaluation.
    ``trained`` says whether the weights were fine-tuned (``None``: :func:`infer_trained` from
    ``extra``, ``evaluation`` and ``training_seconds``).

    The model is saved in float32 whatever precision it was trained in (its variables are float32
    under a mixed policy, so nothing is lost), so every version loads the same way.
    """
    from ml.precision import with_precision

    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{uuid.uuid4().hex[:8]}-", dir=root))
    try:
        with_precision(model, "float32").save(staging / MODEL_FILE)
        if evaluation is not None:
            (staging / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2) + "\n")
        if curves_png is not None:
            (staging / CURVES_FILE).write_bytes(curves_png)
        if ood_gate is not None:
            from ml.ood import OOD_FILE

            ood_gate.save(staging / OOD_FILE)
        # mkdtemp makes the folder private; versions are read by workers that may be other users.
        staging.chmod(0o755)
        # Every numbered folder counts, complete or not, so a broken leftover is never reused.
        version = max((int(p.name) for p in root.iterdir() if _is_number(p.name)), default=0)
        summary: dict[str, Any] = {
            k: evaluation[k]
            for k in ("accuracy", "sensitivity", "specificity", "roc_auc")
            if evaluation and k in evaluation
        }
        if trained is None:
            trained = infer_trained(
                extra or {}, evaluation is not None, training_seconds is not None
            )
        while True:
            version += 1
            metadata = ModelMetadata(
                version=version,
                class_names=list(class_names),
                input_size=int(model.input_shape[1]),
                base_weights=base_weights,
                parent_version=parent_version,
                hyperparameters=dict(hyperparameters or {}),
                dataset=dict(dataset or {}),
                training_seconds=training_seconds,
                metrics=summary,
                job_id=job_id,
                decision_threshold=decision_threshold,
                extra=dict(extra or {}),
                ood=dict(ood or {}),
                trained=trained,
            )
            _write_card(staging, metadata, evaluation)
            (staging / METADATA_FILE).write_text(json.dumps(metadata.to_dict(), indent=2) + "\n")
            try:
                # rename() of a folder onto a missing name is atomic on POSIX; if another writer
                # took this number first it fails and we try the next one.
                os.rename(staging, root / str(version))
            except OSError:
                if (root / str(version)).exists():
                    continue
                raise
            return metadata
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_card(folder: Path, metadata: ModelMetadata, evaluation: dict[str, Any] | None) -> None:
    """Write the version's model card (Markdown) beside its metadata."""
    from ml.model_card import CARD_FILE, build_card, card_markdown

    card = build_card(metadata.to_dict(), evaluation, audit=[])
    (folder / CARD_FILE).write_text(card_markdown(card))


def check_compatible(model: keras.Model, class_names: list[str]) -> int:
    """Check ``model`` takes ``(None, S, S, 1)`` and outputs one probability per class; return S."""
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 1:
        raise IncompatibleModelError(
            f"the model's input must be (batch, S, S, 1) grayscale 0..255, got {shape}"
        )
    out = tuple(model.output_shape)
    if len(out) != 2 or out[1] != len(class_names):
        raise IncompatibleModelError(
            f"the model's output must be (batch, {len(class_names)}) for classes {class_names}, "
            f"got {out}"
        )
    return int(shape[1])


def import_model(
    source: PathLike,
    model_dir: PathLike,
    *,
    class_names: list[str],
    base_weights: str | None = None,
    note: str | None = None,
    dataset_root: PathLike | None = None,
    ood_acceptance: float | None = None,
    trained: bool = True,
) -> ModelMetadata:
    """Publish an existing Keras model file (e.g. trained in a notebook) as a new version.

    With ``dataset_root`` its out-of-distribution gate is fitted on that dataset (ml.ood);
    without, the version has none (``ood.method == "none"``). It counts as trained unless
    ``trained=False`` says otherwise (``cxr import --untrained``).
    """
    from ml.ood import DEFAULT_ACCEPTANCE, fit_gate_on_folder

    try:
        model = read_keras(source)
    except (OSError, ValueError) as exc:
        raise IncompatibleModelError(f"cannot load {source} as a Keras model: {exc}") from exc
    check_compatible(model, class_names)
    acceptance = DEFAULT_ACCEPTANCE if ood_acceptance is None else ood_acceptance
    gate, ood = fit_gate_on_folder(model, dataset_root, class_names, acceptance)
    return save_version(
        model,
        model_dir,
        class_names=class_names,
        base_weights=base_weights,
        extra={"imported_from": os.fspath(source), **({"note": note} if note else {})},
        ood_gate=gate,
        ood=ood,
        trained=trained,
    )


def read_keras(path: PathLike) -> keras.Model:
    """Load a ``.keras`` file without its compiled state, the project's own layers known.

    Keras finds a custom layer only once its class is registered, which importing
    :mod:`ml.layers` does (``IntensityNormalization``).
    """
    import keras

    import ml.layers  # noqa: F401  (registers the layers a saved model may hold)

    return keras.saving.load_model(os.fspath(path), compile=False)


def load_classifier(model_dir: PathLike, version: int, precision: str = "float32") -> Classifier:
    """Load one version as a ready-to-call :class:`ml.model.Classifier` computing in ``precision``.

    Versions are saved in float32; any of them can be served in any precision
    (:func:`ml.precision.with_precision`), its output staying float32.
    """
    from ml.model import Classifier
    from ml.ood import OOD_FILE, load_gate
    from ml.precision import with_precision

    metadata = read_metadata(model_dir, version)
    model = read_keras(version_dir(model_dir, version) / MODEL_FILE)
    model = with_precision(model, precision)
    return Classifier(
        model,
        metadata.class_names,
        version=metadata.version,
        decision_threshold=metadata.decision_threshold,
        gate=load_gate(version_dir(model_dir, version) / OOD_FILE),
        trained=metadata.trained,
    )


def load_model(model_dir: PathLike, version: int) -> keras.Model:
    """Load one version's Keras model (compiled state dropped), e.g. to fine-tune it further."""
    if not has_version(model_dir, version):
        raise VersionNotFoundError(f"no model version {version} in {model_dir}")
    return read_keras(version_dir(model_dir, version) / MODEL_FILE)


def read_active_file(model_dir: PathLike) -> int | None:
    """The active version recorded in ``active.json``, or ``None``."""
    path = Path(model_dir) / ACTIVE_FILE
    try:
        version = json.loads(path.read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    is_number = isinstance(version, int) and not isinstance(version, bool)
    return int(version) if is_number else None


def write_active_file(model_dir: PathLike, version: int) -> None:
    """Record ``version`` as active in ``active.json`` (atomically)."""
    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    doc = {"version": version, "changed_at": datetime.now(UTC).isoformat()}
    fd, tmp = tempfile.mkstemp(prefix=".active-", dir=root)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(doc) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, root / ACTIVE_FILE)
