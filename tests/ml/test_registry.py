"""The registry parts of ml.versions: trained-version files, job ids, imports, the active file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import pytest

from ml.model import build_classifier
from ml.versions import (
    CURVES_FILE,
    EVALUATION_FILE,
    IncompatibleModelError,
    VersionNotFoundError,
    curves_path,
    find_version_by_job,
    has_version,
    import_model,
    list_versions,
    read_active_file,
    read_evaluation,
    read_metadata,
    save_version,
    write_active_file,
)
from tests.conftest import CLASSES, ROOT, TINY_SIZE

PNG = b"\x89PNG\r\n\x1a\nfake"
EVALUATION = {"accuracy": 0.9, "sensitivity": 0.95, "specificity": 0.8, "roc_auc": 0.93, "n": 10}


@pytest.fixture(scope="module")
def model() -> keras.Model:
    """A tiny untrained classifier."""
    keras.utils.set_random_seed(5)
    return build_classifier(CLASSES, input_size=TINY_SIZE, base_weights=None)


def test_trained_version_round_trip(model: keras.Model, tmp_path: Path) -> None:
    meta = save_version(
        model,
        tmp_path,
        class_names=CLASSES,
        base_weights=None,
        parent_version=None,
        hyperparameters={"epochs_head": 1},
        dataset={"sha256": "ab", "files": 3},
        training_seconds=12.5,
        evaluation=EVALUATION,
        curves_png=PNG,
        job_id="job-1",
    )
    assert read_metadata(tmp_path, meta.version) == meta
    assert meta.metrics == {
        k: EVALUATION[k] for k in ("accuracy", "sensitivity", "specificity", "roc_auc")
    }
    assert read_evaluation(tmp_path, meta.version) == EVALUATION
    curves = curves_path(tmp_path, meta.version)
    assert curves is not None and curves.read_bytes() == PNG
    assert find_version_by_job(tmp_path, "job-1") == meta.version
    assert find_version_by_job(tmp_path, "job-2") is None
    assert oct((tmp_path / str(meta.version)).stat().st_mode & 0o777) == "0o755"


def test_untrained_version_has_no_evaluation(model: keras.Model, tmp_path: Path) -> None:
    meta = save_version(model, tmp_path, class_names=CLASSES, base_weights=None)
    assert read_evaluation(tmp_path, meta.version) is None
    assert curves_path(tmp_path, meta.version) is None
    assert not (tmp_path / "1" / EVALUATION_FILE).exists()
    assert not (tmp_path / "1" / CURVES_FILE).exists()


def test_missing_version_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VersionNotFoundError, match="no model version 7"):
        read_metadata(tmp_path, 7)
    assert not has_version(tmp_path, 7)


def test_number_after_an_incomplete_folder_is_never_reused(
    model: keras.Model, tmp_path: Path
) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "metadata.json").write_text("{}")
    assert save_version(model, tmp_path, class_names=CLASSES, base_weights=None).version == 2


def test_killed_mid_write_leaves_no_version(tmp_path: Path) -> None:
    """SIGKILL while model.save is writing: no version folder appears."""
    script = textwrap.dedent(
        f"""
        import time, keras
        from ml.model import build_classifier
        from ml import versions
        model = build_classifier({CLASSES!r}, input_size={TINY_SIZE}, base_weights=None)
        original = model.save
        def slow_save(path, *a, **k):
            original(path, *a, **k)
            open({str(tmp_path / "saved")!r}, "w").close()
            time.sleep(60)
        model.save = slow_save
        versions.save_version(model, {str(tmp_path / "models")!r}, class_names={CLASSES!r},
                              base_weights=None)
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "saved").exists():
            assert proc.poll() is None, "the writer exited early"
            assert time.monotonic() < deadline, "the writer never reached model.save"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    models = tmp_path / "models"
    assert list_versions(models) == []
    assert [p.name for p in models.iterdir() if not p.name.startswith(".staging-")] == []


def test_import_a_compatible_model(model: keras.Model, tmp_path: Path) -> None:
    source = tmp_path / "notebook.keras"
    model.save(source)
    meta = import_model(source, tmp_path / "models", class_names=CLASSES, note="from a notebook")
    assert meta.version == 1 and meta.input_size == TINY_SIZE
    assert meta.extra["imported_from"] == str(source)


def test_import_refuses_what_does_not_fit(model: keras.Model, tmp_path: Path) -> None:
    source = tmp_path / "m.keras"
    model.save(source)
    with pytest.raises(IncompatibleModelError, match="output must be"):
        import_model(source, tmp_path / "models", class_names=["A", "B", "C"])
    rgb = keras.Sequential([keras.Input((TINY_SIZE, TINY_SIZE, 3)), keras.layers.Flatten(),
                            keras.layers.Dense(2, activation="softmax")])  # fmt: skip
    rgb.save(tmp_path / "rgb.keras")
    with pytest.raises(IncompatibleModelError, match="input must be"):
        import_model(tmp_path / "rgb.keras", tmp_path / "models", class_names=CLASSES)
    (tmp_path / "junk.keras").write_bytes(b"not a model")
    with pytest.raises(IncompatibleModelError, match="cannot load"):
        import_model(tmp_path / "junk.keras", tmp_path / "models", class_names=CLASSES)
    assert list_versions(tmp_path / "models") == []


def test_active_file(tmp_path: Path) -> None:
    assert read_active_file(tmp_path) is None
    write_active_file(tmp_path, 3)
    assert read_active_file(tmp_path) == 3
    assert json.loads((tmp_path / "active.json").read_text())["version"] == 3
    write_active_file(tmp_path, 4)
    assert read_active_file(tmp_path) == 4
    (tmp_path / "active.json").write_text("garbage")
    assert read_active_file(tmp_path) is None
    assert [p.name for p in tmp_path.iterdir()] == ["active.json"]
