"""Tests of ml.training: dataset loading, TrainConfig, the two-phase training run and its CLI.

Tests that only need *a* dataset use ``$CXR_TEST_DATA_DIR`` (a folder in the Kaggle layout, e.g.
the real 256 px X-ray set) when it is set, and otherwise a small synthetic set drawn with Pillow.
Tests that need a particular defect (an unreadable file, an empty class, a missing split) always
build their own synthetic set. Models are tiny: 32 px input, random weights, 1 + 1 epochs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from cli.train import main
from ml import progress
from ml.config import TrainConfig
from ml.dataset import Dataset, DatasetError, load_dataset
from ml.model import build_classifier
from ml.precision import model_precision
from ml.progress import BatchReport, EpochReport, TrainingCancelled
from ml.training import TrainResult, balanced_class_weights, set_trainable_blocks, train
from tests.dicoms import dicom_bytes

TWO = ("NORMAL", "PNEUMONIA")
THREE = ("COVID19", "NORMAL", "PNEUMONIA")
SYNTHETIC_COUNTS = {"train": 8, "val": 2, "test": 4}
TINY = TrainConfig(
    input_size=32,
    epochs_head=1,
    epochs_finetune=1,
    finetune_blocks=1,
    batch_size=4,
    max_images_per_class=8,
    base_weights=None,
    seed=7,
)
HISTORY_KEYS = {"phase", "epoch", "loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"}


def draw_xray(rng: np.random.Generator, label: int, width: int, height: int) -> Image.Image:
    """A fake chest film: two dark "lungs" on a bright body, cloudy patches for disease classes."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    body = 170 - 60 * ((xx - width / 2) / width) ** 2
    lungs = np.zeros_like(body)
    for cx in (0.32 * width, 0.68 * width):
        lungs += 90 * np.exp(
            -(((xx - cx) / (0.14 * width)) ** 2 + ((yy - height / 2) / (0.3 * height)) ** 2)
        )
    pixels = body - lungs
    for _ in range(label * 2):  # label 0 (NORMAL in a sorted two-class set) stays clear
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.3, 0.7) * height
        pixels += 60 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (0.08 * width) ** 2))
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")


def make_dataset(
    root: Path,
    classes: Sequence[str] = TWO,
    counts: dict[str, int] | None = None,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset ``root/<split>/<CLASS>/*.{png,jpg}`` and return ``root``."""
    rng = np.random.default_rng(seed)
    for split, n in (counts or SYNTHETIC_COUNTS).items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                # Mixed formats and non-square sizes, as in real uploads.
                image = draw_xray(rng, label, width=int(rng.integers(40, 72)), height=56)
                if i % 2:
                    image.save(folder / f"{name.lower()}-{i:03d}.png")
                else:
                    image.save(folder / f"{name.lower()}-{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$CXR_TEST_DATA_DIR if set, else a synthetic two-class set."""
    configured = os.environ.get("CXR_TEST_DATA_DIR")
    if configured:
        return Path(configured)
    return make_dataset(tmp_path_factory.mktemp("cxr-synthetic"))


@pytest.fixture(scope="module")
def tiny_dataset(data_root: Path) -> Dataset:
    return load_dataset(data_root, TINY)


@pytest.fixture(scope="module")
def tiny_batch_reports() -> list[BatchReport]:
    """The in-epoch reports of ``tiny_run`` (one per batch: the interval is set to 0)."""
    return []


@pytest.fixture(scope="module")
def tiny_run(
    tiny_dataset: Dataset, tiny_batch_reports: list[BatchReport]
) -> tuple[TrainResult, list[EpochReport]]:
    """One tiny two-phase training run shared by several tests."""
    reports: list[EpochReport] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(progress, "BATCH_REPORT_SECONDS", 0.0)
        result = train(
            TINY, tiny_dataset, on_epoch=reports.append, on_batch=tiny_batch_reports.append
        )
    return result, reports


# ---------------------------------------------------------------------------------------------
# TrainConfig


def test_importing_the_module_does_not_import_tensorflow() -> None:
    # TF-free processes (the web side) may validate a TrainConfig or read a dataset.
    code = "import sys, ml.training; print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_config_round_trips_through_dict() -> None:
    config = TrainConfig(input_size=96, finetune_blocks=5, base_weights=None, augment=False)
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert TrainConfig.from_dict(data) == config
    assert TrainConfig.from_dict({}) == TrainConfig()


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="epochs_heads"):
        TrainConfig.from_dict({"epochs_heads": 3})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("input_size", 16),
        ("input_size", 224.0),
        ("epochs_head", -1),
        ("epochs_head", True),
        ("learning_rate_head", 0),
        ("learning_rate_finetune", float("nan")),
        ("finetune_blocks", 6),
        ("batch_size", 0),
        ("seed", -1),
        ("augment", "yes"),
        ("patience", 0),
        ("val_fraction", 0.9),
        ("min_val_images", -5),
        ("max_images_per_class", 0),
        ("base_weights", ""),
    ],
)
def test_config_rejects_out_of_range_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig.from_dict({field: value})


def test_config_refuses_a_run_with_no_epochs() -> None:
    with pytest.raises(ValueError, match="nothing to train"):
        TrainConfig(epochs_head=0, epochs_finetune=5, finetune_blocks=0)
    assert TrainConfig(epochs_head=0, finetune_blocks=5).planned_epochs(2) == 5


# ---------------------------------------------------------------------------------------------
# load_dataset


def test_load_dataset_shapes_and_classes(tiny_dataset: Dataset) -> None:
    ds = tiny_dataset
    assert ds.class_names == list(TWO)
    for split in ("train", "val", "test"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape == (len(y), 32, 32, 1)
        assert x.min() >= 0.0 and x.max() <= 255.0
        assert set(y.tolist()) == {0, 1}, split
    assert np.bincount(ds.y_test).max() <= 8
    counts = ds.fingerprint["counts"]
    assert counts["train"]["NORMAL"] == int((ds.y_train == 0).sum())
    assert ds.fingerprint["files"] == len(ds.y_train) + len(ds.y_val) + len(ds.y_test)
    assert len(ds.fingerprint["sha256"]) == 64


def test_small_val_split_is_replaced_by_a_stratified_seeded_split(
    data_root: Path, tiny_dataset: Dataset
) -> None:
    # Both the synthetic val/ (4 images) and a capped real one (16) are below 50 images.
    assert tiny_dataset.fingerprint["val_source"] == "split from train"
    assert set(tiny_dataset.y_val.tolist()) == {0, 1}
    again = load_dataset(data_root, TINY)
    np.testing.assert_array_equal(again.x_val, tiny_dataset.x_val)
    np.testing.assert_array_equal(again.y_train, tiny_dataset.y_train)
    assert again.fingerprint == tiny_dataset.fingerprint


def test_large_enough_val_split_is_used_as_is(data_root: Path) -> None:
    config = TrainConfig(input_size=32, max_images_per_class=2, min_val_images=4, base_weights=None)
    ds = load_dataset(data_root, config)
    assert ds.fingerprint["val_source"] == "val"
    assert ds.fingerprint["counts"]["val"] == {"NORMAL": 2, "PNEUMONIA": 2}


def test_unreadable_file_is_skipped_and_listed(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    (root / "train" / "NORMAL" / "garbage.jpg").write_bytes(b"this is not a JPEG at all")
    config = TrainConfig(input_size=32, base_weights=None, min_val_images=0)
    ds = load_dataset(root, config)
    assert ds.skipped == ["train/NORMAL/garbage.jpg"]
    assert ds.fingerprint["counts"]["train"]["NORMAL"] == SYNTHETIC_COUNTS["train"]


def test_non_image_files_and_hidden_folders_are_ignored(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    (root / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    ds = load_dataset(root, TrainConfig(input_size=32, base_weights=None, min_val_images=0))
    assert ds.class_names == list(TWO)
    assert ds.skipped == []


def test_training_under_bfloat16_gives_a_float32_model(tiny_dataset: Dataset) -> None:
    """Issue 9: the steps compute in bf16; the result, its evaluation and threshold are float32."""
    result = train(TINY, tiny_dataset, precision="bfloat16")
    assert result.precision == "bfloat16"
    assert model_precision(result.model) == "float32"
    assert result.evaluation["n"] == len(tiny_dataset.y_test)
    assert np.isfinite(result.history[-1]["loss"])


def test_dicom_files_in_the_kaggle_layout_are_loaded_like_their_pngs(tmp_path: Path) -> None:
    """Issue 10: the loader reads .dcm files through the same decoder as uploads."""
    root = make_dataset(tmp_path / "ds")
    config = TrainConfig(input_size=32, base_weights=None, min_val_images=0)
    before = load_dataset(root, config)
    for path in sorted(root.rglob("*.png")):
        pixels = np.asarray(Image.open(path).convert("L"))
        path.with_suffix(".dcm").write_bytes(dicom_bytes(pixels, modality="CR"))
        path.unlink()
    after = load_dataset(root, config)
    assert after.skipped == []
    assert len(after.y_train) == len(before.y_train) and len(after.y_test) == len(before.y_test)
    np.testing.assert_array_equal(np.sort(after.x_train.ravel()), np.sort(before.x_train.ravel()))


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_required_split_is_named(split: str, tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    shutil.rmtree(root / split)
    with pytest.raises(DatasetError, match=f"no {split}/ folder"):
        load_dataset(root, TINY)


def test_missing_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nowhere", TINY)


def test_missing_val_split_is_fine(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    shutil.rmtree(root / "val")
    ds = load_dataset(root, TINY)
    assert ds.fingerprint["val_source"] == "split from train"


@pytest.mark.parametrize("split", ["train", "test"])
def test_class_without_readable_images_is_named(split: str, tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    folder = root / split / "PNEUMONIA"
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DatasetError, match=f"{split}/PNEUMONIA"):
        load_dataset(root, TINY)


def test_classes_must_agree_between_splits(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    shutil.copytree(root / "test" / "NORMAL", root / "test" / "COVID19")
    with pytest.raises(DatasetError, match=r"test/ .*extra \['COVID19'\]"):
        load_dataset(root, TINY)


def test_a_single_class_is_not_a_dataset(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", classes=("NORMAL",))
    with pytest.raises(DatasetError, match="at least two class folders"):
        load_dataset(root, TINY)


def test_fingerprint_changes_when_a_file_changes(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    config = TrainConfig(input_size=32, base_weights=None)
    before = load_dataset(root, config).fingerprint
    target = root / "test" / "NORMAL" / "normal-001.png"
    Image.fromarray(np.full((50, 50), 77, np.uint8)).save(target)
    after = load_dataset(root, config).fingerprint
    assert after["sha256"] != before["sha256"]
    assert after["counts"] == before["counts"]


def test_three_class_dataset_trains(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", classes=THREE, counts={"train": 5, "test": 2})
    config = TrainConfig(
        input_size=32, epochs_head=1, finetune_blocks=0, batch_size=8, base_weights=None
    )
    ds = load_dataset(root, config)
    assert ds.class_names == list(THREE)
    assert ds.fingerprint["counts"]["val"] == {"COVID19": 1, "NORMAL": 1, "PNEUMONIA": 1}
    result = train(config, ds)
    assert [row["phase"] for row in result.history] == [1]
    assert result.evaluation["negative_class"] == "NORMAL"
    assert len(result.evaluation["confusion_matrix"]) == 3
    assert result.model.output_shape == (None, 3)


# ---------------------------------------------------------------------------------------------
# train


def test_balanced_class_weights() -> None:
    weights = balanced_class_weights(np.array([0, 1, 1, 1]), 2)
    assert weights == pytest.approx({0: 2.0, 1: 2 / 3})


def test_tiny_run_records_both_phases(tiny_run: tuple[TrainResult, list[EpochReport]]) -> None:
    result, _ = tiny_run
    assert [(row["phase"], row["epoch"]) for row in result.history] == [(1, 1), (2, 2)]
    for row in result.history:
        assert set(row) == HISTORY_KEYS
        assert all(isinstance(row[k], float) for k in HISTORY_KEYS - {"phase", "epoch"})
    assert result.curves_png.startswith(b"\x89PNG")
    assert result.seconds > 0
    assert result.config == TINY
    for key in ("n", "accuracy", "sensitivity", "specificity", "roc_auc", "confusion_matrix"):
        assert key in result.evaluation
    assert result.evaluation["n"] == len(result.dataset.y_test)
    json.dumps(result.evaluation)


def test_on_epoch_reports_every_epoch(tiny_run: tuple[TrainResult, list[EpochReport]]) -> None:
    result, reports = tiny_run
    assert [(r.phase, r.epoch, r.phase_epoch, r.phase_epochs) for r in reports] == [
        (1, 1, 1, 1),
        (2, 2, 1, 1),
    ]
    assert [r.total_epochs for r in reports] == [2, 2]
    assert reports[0].eta_seconds is not None and reports[0].eta_seconds > 0
    assert reports[-1].eta_seconds == 0
    assert reports[0].elapsed_seconds < reports[1].elapsed_seconds
    assert reports[1].metrics == {
        k: v for k, v in result.history[1].items() if k not in ("phase", "epoch")
    }


def test_on_batch_reports_where_the_running_epoch_is(
    tiny_run: tuple[TrainResult, list[EpochReport]],
    tiny_batch_reports: list[BatchReport],
    tiny_dataset: Dataset,
) -> None:
    batches = math.ceil(len(tiny_dataset.y_train) / TINY.batch_size)
    assert [(r.phase, r.epoch, r.batch) for r in tiny_batch_reports] == [
        (phase, phase, b) for phase in (1, 2) for b in range(1, batches + 1)
    ]
    assert {(r.batches, r.total_epochs) for r in tiny_batch_reports} == {(batches, 2)}
    etas = [r.eta_seconds for r in tiny_batch_reports]
    assert all(eta is not None and eta >= 0 for eta in etas)
    assert etas[-1] == 0  # the last batch of the last epoch
    elapsed = [r.elapsed_seconds for r in tiny_batch_reports]
    assert elapsed == sorted(elapsed)


def test_phase_two_unfroze_only_the_last_block(
    tiny_run: tuple[TrainResult, list[EpochReport]],
) -> None:
    base = tiny_run[0].model.get_layer("vgg16")
    assert base.get_layer("block4_conv1").trainable is False
    assert base.get_layer("block4_pool").trainable is False
    assert base.get_layer("block5_conv1").trainable is True
    assert base.get_layer("block5_conv3").trainable is True


def test_set_trainable_blocks() -> None:
    keras.utils.set_random_seed(0)
    model = build_classifier(list(TWO), input_size=32, base_weights=None)
    base = model.get_layer("vgg16")

    set_trainable_blocks(model, 2)
    flags = {layer.name: layer.trainable for layer in base.layers if "conv1" in layer.name}
    assert flags == {f"block{b}_conv1": b >= 4 for b in range(1, 6)}
    assert model.get_layer("predictions").trainable

    set_trainable_blocks(model, 0)
    assert not base.trainable_weights
    assert model.trainable_weights  # the head

    set_trainable_blocks(model, 5)
    assert len(base.trainable_weights) == len(base.weights) == 26


def test_training_is_deterministic(tiny_dataset: Dataset) -> None:
    # One epoch of the whole network (the from-scratch recipe), twice from the same seed.
    config = TrainConfig.from_dict(
        {**TINY.to_dict(), "epochs_head": 0, "epochs_finetune": 1, "finetune_blocks": 5}
    )
    first = train(config, tiny_dataset)
    second = train(config, tiny_dataset)
    assert [row["phase"] for row in first.history] == [2]
    for a, b in zip(first.model.get_weights(), second.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for row_a, row_b in zip(first.history, second.history, strict=True):
        assert row_a == pytest.approx(row_b)


def test_should_stop_cancels_training(tiny_dataset: Dataset) -> None:
    with pytest.raises(TrainingCancelled):
        train(TINY, tiny_dataset, should_stop=lambda: True)


def test_should_stop_cancels_in_phase_two(tiny_dataset: Dataset) -> None:
    reports: list[EpochReport] = []
    # Stop at the first batch after phase 1's only epoch has been reported.
    with pytest.raises(TrainingCancelled):
        train(TINY, tiny_dataset, on_epoch=reports.append, should_stop=lambda: bool(reports))
    assert [r.epoch for r in reports] == [1]


def test_continue_from_a_trained_model(
    tiny_run: tuple[TrainResult, list[EpochReport]], tiny_dataset: Dataset
) -> None:
    trained = tiny_run[0].model
    before = [w.copy() for w in trained.get_weights()]
    # A vanishing learning rate: the continued model must still hold the weights it started from.
    config = TrainConfig.from_dict(
        {**TINY.to_dict(), "learning_rate_head": 1e-12, "learning_rate_finetune": 1e-12}
    )
    result = train(config, tiny_dataset, base_model=trained)
    for start, end, untouched in zip(
        before, result.model.get_weights(), trained.get_weights(), strict=True
    ):
        np.testing.assert_allclose(end, start, atol=1e-6)
        np.testing.assert_array_equal(untouched, start)  # the caller's model is not modified
    assert result.model is not trained
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_continue_refuses_a_model_with_other_classes(tiny_dataset: Dataset) -> None:
    keras.utils.set_random_seed(0)
    three = build_classifier(list(THREE), input_size=32, base_weights=None)
    with pytest.raises(ValueError, match="3 outputs"):
        train(TINY, tiny_dataset, base_model=three)


def test_continue_refuses_a_model_with_another_intensity_layer(tiny_dataset: Dataset) -> None:
    keras.utils.set_random_seed(0)
    equalizing = build_classifier(list(TWO), input_size=32, base_weights=None, intensity="equalize")
    with pytest.raises(ValueError, match="'equalize', but config.intensity is 'none'"):
        train(TINY, tiny_dataset, base_model=equalizing)


def test_dataset_and_config_sizes_must_agree(tiny_dataset: Dataset) -> None:
    config = TrainConfig.from_dict({**TINY.to_dict(), "input_size": 48})
    with pytest.raises(ValueError, match="input_size"):
        train(config, tiny_dataset)


# ---------------------------------------------------------------------------------------------
# python -m ml.training


def test_main_writes_the_run_folder(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [
        "--dataset", str(data_root), "--out", str(out), "--input-size", "32",
        "--epochs-head", "1", "--finetune-blocks", "0",
        "--max-images-per-class", "4", "--batch-size", "8", "--base-weights", "none",
        "--no-augment", "--target-sensitivity", "1.0",
    ]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "curves.png",
        "evaluation.json",
        "history.json",
        "model.keras",
        "run.json",
    ]
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["augment"] is False and run["config"]["base_weights"] is None
    assert run["config"]["target_sensitivity"] == 1.0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["class_names"] == list(TWO)
    # Chosen on the val split, then used to label the test split.
    assert isinstance(run["decision_threshold"], float)
    assert evaluation["threshold"] == run["decision_threshold"]
    assert [row["phase"] for row in json.loads((out / "history.json").read_text())] == [1]
    model = keras.saving.load_model(out / "model.keras")  # uncompiled: no custom objects needed
    assert model.input_shape == (None, 32, 32, 1)


def test_main_reports_a_bad_dataset(tmp_path: Path) -> None:
    argv = ["--dataset", str(tmp_path), "--out", str(tmp_path / "out"), "--base-weights", "none"]
    assert main(argv) == 2
    assert not (tmp_path / "out").exists()
