"""Unit tests for ml.versions: numbered model folders published atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from ml.model import Classifier, build_classifier
from ml.versions import (
    METADATA_FILE,
    MODEL_FILE,
    ModelMetadata,
    latest_version,
    list_versions,
    load_classifier,
    read_metadata,
    save_version,
)
from tests.conftest import CLASSES, TINY_SIZE


@pytest.fixture(scope="module")
def model() -> keras.Model:
    """An untrained tiny classifier (built once for the module)."""
    keras.utils.set_random_seed(3)
    return build_classifier(CLASSES, input_size=TINY_SIZE, base_weights=None)


@pytest.fixture(scope="module")
def two_versions(
    model: keras.Model, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, ModelMetadata, ModelMetadata]:
    """A model folder with the module's model saved twice, and the two returned metadata."""
    model_dir = tmp_path_factory.mktemp("versions") / "models"  # created by save_version
    first = save_version(model, model_dir, class_names=CLASSES, base_weights=None)
    second = save_version(
        model,
        model_dir,
        class_names=CLASSES,
        base_weights="/weights/vgg16_notop.h5",
        parent_version=first.version,
        decision_threshold=0.3,
        extra={"epochs": 3, "val_accuracy": 0.9},
    )
    return model_dir, first, second


def copy_version(src_dir: Path, version: int, dst_dir: Path) -> None:
    """Copy one complete version folder into ``dst_dir``."""
    shutil.copytree(src_dir / str(version), dst_dir / str(version))


def test_save_twice_gives_versions_1_and_2(
    two_versions: tuple[Path, ModelMetadata, ModelMetadata],
) -> None:
    model_dir, first, second = two_versions
    assert (first.version, second.version) == (1, 2)
    assert list_versions(model_dir) == [1, 2]
    assert latest_version(model_dir) == 2
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]  # no staging left over
    for v in (1, 2):
        assert (model_dir / str(v) / MODEL_FILE).is_file()
        assert (model_dir / str(v) / METADATA_FILE).is_file()


def test_metadata_round_trip(two_versions: tuple[Path, ModelMetadata, ModelMetadata]) -> None:
    model_dir, first, second = two_versions
    assert read_metadata(model_dir, 1) == first
    assert read_metadata(model_dir, 2) == second
    assert first.class_names == CLASSES
    assert first.input_size == TINY_SIZE
    assert first.base_weights is None
    assert first.parent_version is None
    assert first.extra == {}
    assert second.base_weights == "/weights/vgg16_notop.h5"
    assert second.parent_version == 1
    assert second.extra == {"epochs": 3, "val_accuracy": 0.9}


def test_metadata_json_content(two_versions: tuple[Path, ModelMetadata, ModelMetadata]) -> None:
    model_dir, _, second = two_versions
    doc = json.loads((model_dir / "2" / METADATA_FILE).read_text())
    assert set(doc) == {
        "version",
        "class_names",
        "input_size",
        "base_weights",
        "created_at",
        "parent_version",
        "hyperparameters",
        "dataset",
        "training_seconds",
        "metrics",
        "job_id",
        "decision_threshold",
        "extra",
        "ood",
        "trained",
    }
    assert doc == second.to_dict()
    assert doc["version"] == 2
    assert doc["class_names"] == CLASSES
    assert doc["input_size"] == TINY_SIZE
    assert doc["created_at"].endswith("+00:00")  # timezone-aware UTC


def test_metadata_ignores_unknown_keys() -> None:
    data: dict[str, Any] = {
        "version": 4,
        "class_names": ["A", "B"],
        "input_size": 64,
        "base_weights": "imagenet",
        "written_by": "a newer release",
    }
    meta = ModelMetadata.from_dict(data)
    assert meta.version == 4
    assert meta.base_weights == "imagenet"
    assert "written_by" not in meta.to_dict()


def test_load_classifier_predicts_like_the_original(
    model: keras.Model, two_versions: tuple[Path, ModelMetadata, ModelMetadata]
) -> None:
    model_dir, _, _ = two_versions
    loaded = load_classifier(model_dir, 2)
    assert isinstance(loaded, Classifier)
    assert loaded.version == 2
    assert loaded.decision_threshold == 0.3
    assert load_classifier(model_dir, 1).decision_threshold is None
    assert loaded.class_names == CLASSES
    assert loaded.input_size == TINY_SIZE
    x = np.random.default_rng(0).uniform(0, 255, (3, TINY_SIZE, TINY_SIZE, 1)).astype(np.float32)
    expected = Classifier(model, CLASSES).predict_batch(x)
    np.testing.assert_allclose(loaded.predict_batch(x), expected, rtol=1e-5, atol=1e-6)


def test_load_classifier_from_shared_fixture(tiny_model_dir: Path) -> None:
    assert list_versions(tiny_model_dir) == [1]
    classifier = load_classifier(tiny_model_dir, 1)
    assert classifier.version == 1
    assert classifier.class_names == CLASSES
    probs = classifier.predict_batch(np.zeros((2, TINY_SIZE, TINY_SIZE, 1), np.float32))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_incomplete_folders_are_ignored(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy_version(tiny_model_dir, 1, tmp_path)
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / METADATA_FILE).write_text("{}")  # no model file
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / MODEL_FILE).write_bytes(b"partial")  # no metadata
    (tmp_path / "5").mkdir()  # empty
    staging = tmp_path / ".staging-deadbeef-xyz"
    shutil.copytree(tmp_path / "1", staging)  # complete but hidden
    shutil.copytree(tmp_path / "1", tmp_path / "latest")  # complete but not numeric
    shutil.copytree(tmp_path / "1", tmp_path / "-7")  # isdigit() is False for a sign
    (tmp_path / "9").write_text("a file, not a folder")
    assert list_versions(tmp_path) == [1]
    assert latest_version(tmp_path) == 1


def test_list_versions_sorts_numerically(tiny_model_dir: Path, tmp_path: Path) -> None:
    for v in (10, 2, 1):
        shutil.copytree(tiny_model_dir / "1", tmp_path / str(v))
    assert list_versions(tmp_path) == [1, 2, 10]
    assert latest_version(tmp_path) == 10


def test_missing_and_empty_dirs(tmp_path: Path) -> None:
    assert latest_version(tmp_path / "missing") is None
    assert list_versions(tmp_path / "missing") == []
    assert list_versions(tmp_path) == []
    assert latest_version(tmp_path) is None
    (tmp_path / "a-file").write_text("x")
    assert list_versions(tmp_path / "a-file") == []


def test_save_continues_after_the_highest_version(
    model: keras.Model, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # A gap in the numbering does not matter: the next version is highest + 1.
    copy_version(tiny_model_dir, 1, tmp_path)
    (tmp_path / "1").rename(tmp_path / "5")
    meta = save_version(model, tmp_path, class_names=CLASSES, base_weights=None)
    assert meta.version == 6
    assert list_versions(tmp_path) == [5, 6]


def test_failed_save_leaves_nothing_behind(
    model: keras.Model, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_version(tiny_model_dir, 1, tmp_path)
    seen: list[Path] = []

    def broken_save(path: Any, *args: Any, **kwargs: Any) -> None:
        Path(path).write_bytes(b"half a model")
        seen.append(Path(path))
        raise OSError("disk full")

    monkeypatch.setattr(model, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_version(model, tmp_path, class_names=CLASSES, base_weights=None)
    monkeypatch.undo()

    assert len(seen) == 1
    assert seen[0].parent.parent == tmp_path  # it was writing inside a staging folder
    assert seen[0].parent.name.startswith(".staging-")
    assert not seen[0].parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
    assert list_versions(tmp_path) == [1]


def test_trained_is_stated_or_inferred(
    two_versions: tuple[Path, ModelMetadata, ModelMetadata], model: keras.Model, tmp_path: Path
) -> None:
    """Bare saves of a built model are untrained; an evaluation, a time or a flag say otherwise."""
    _, first, second = two_versions
    assert first.trained is False and second.trained is False
    evaluated = save_version(
        model, tmp_path, class_names=CLASSES, base_weights=None, evaluation={"accuracy": 0.5}
    )
    assert evaluated.trained is True
    flagged = save_version(model, tmp_path, class_names=CLASSES, base_weights=None, trained=True)
    assert read_metadata(tmp_path, flagged.version).trained is True


def test_metadata_without_trained_is_inferred() -> None:
    """Metadata written before the field: init-model's flag, imports, evaluations."""
    base: dict[str, Any] = {"version": 1, "class_names": CLASSES, "input_size": 32,
                            "base_weights": None}  # fmt: skip
    assert ModelMetadata.from_dict(base | {"extra": {"trained": False}}).trained is False
    assert ModelMetadata.from_dict(base).trained is False  # nothing says it was trained
    assert ModelMetadata.from_dict(base | {"extra": {"imported_from": "a.keras"}}).trained
    assert ModelMetadata.from_dict(base | {"metrics": {"accuracy": 0.9}}).trained
    assert ModelMetadata.from_dict(base | {"training_seconds": 12.0}).trained
    assert ModelMetadata.from_dict(base | {"trained": True, "extra": {"trained": False}}).trained
