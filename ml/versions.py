"""Model versions on disk: ``MODEL_DIR/<N>/model.keras`` plus ``metadata.json``.

A version is written into a hidden temporary folder beside the others and renamed into place, so
a reader never sees half a version and a crash mid-write leaves none behind.
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

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"


@dataclass(frozen=True)
class ModelMetadata:
    """What is known about a version besides its weights."""

    version: int
    class_names: list[str]
    input_size: int
    base_weights: str | None
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    parent_version: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMetadata:
        """Read metadata written by :meth:`to_dict`, ignoring keys it does not know."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-native form stored in ``metadata.json``."""
        return asdict(self)


def list_versions(model_dir: str | os.PathLike[str]) -> list[int]:
    """Return the complete version numbers under ``model_dir``, ascending."""
    root = Path(model_dir)
    if not root.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in root.iterdir()
        if _is_number(p.name) and (p / MODEL_FILE).is_file() and (p / METADATA_FILE).is_file()
    )


def _is_number(name: str) -> bool:
    return name.isascii() and name.isdigit()


def latest_version(model_dir: str | os.PathLike[str]) -> int | None:
    """Return the highest version number present, or ``None`` when there is none."""
    versions = list_versions(model_dir)
    return versions[-1] if versions else None


def read_metadata(model_dir: str | os.PathLike[str], version: int) -> ModelMetadata:
    """Read ``metadata.json`` of one version."""
    path = Path(model_dir) / str(version) / METADATA_FILE
    return ModelMetadata.from_dict(json.loads(path.read_text()))


def save_version(
    model: keras.Model,
    model_dir: str | os.PathLike[str],
    *,
    class_names: list[str],
    base_weights: str | None,
    parent_version: int | None = None,
    extra: dict[str, Any] | None = None,
) -> ModelMetadata:
    """Publish ``model`` as the next version number under ``model_dir`` and return its metadata."""
    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{uuid.uuid4().hex[:8]}-", dir=root))
    try:
        model.save(staging / MODEL_FILE)
        # mkdtemp makes the folder private; versions are read by workers that may be other users.
        staging.chmod(0o755)
        # Every numbered folder counts, complete or not, so a broken leftover is never reused.
        version = max((int(p.name) for p in root.iterdir() if _is_number(p.name)), default=0)
        while True:
            version += 1
            metadata = ModelMetadata(
                version=version,
                class_names=list(class_names),
                input_size=int(model.input_shape[1]),
                base_weights=base_weights,
                parent_version=parent_version,
                extra=dict(extra or {}),
            )
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


def load_classifier(model_dir: str | os.PathLike[str], version: int) -> Classifier:
    """Load one version as a ready-to-call :class:`ml.model.Classifier`."""
    import keras

    from ml.model import Classifier

    metadata = read_metadata(model_dir, version)
    model = keras.saving.load_model(Path(model_dir) / str(version) / MODEL_FILE, compile=False)
    return Classifier(model, metadata.class_names, version=metadata.version)
