"""Tests of the ``cxr`` command, run in-process through ``cli.main.main``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from ml.versions import latest_version, list_versions, read_metadata
from tests.conftest import CLASSES, TINY_SIZE
from tests.ml.test_training import make_dataset

THREE = ["NORMAL", "PNEUMONIA", "COVID19"]


def gradient_image(width: int = 80, height: int = 64) -> Image.Image:
    """A grayscale ramp with a bright disc, a stand-in for an X-ray."""
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = xx * 255.0 / (width - 1)
    pixels[(yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (height / 4) ** 2] = 255
    return Image.fromarray(pixels.astype(np.uint8), mode="L")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A generated PNG, a JPEG (a real one from $CXR_TEST_DATA_DIR when set) and a non-image."""
    folder = tmp_path_factory.mktemp("images")
    png = folder / "generated.png"
    gradient_image().save(png)

    data_dir = os.environ.get("CXR_TEST_DATA_DIR")
    if data_dir:
        # Kaggle layout: <split>/<CLASS>/*.jpg (or .jpeg)
        found = sorted(
            p
            for p in Path(data_dir).glob("*/*/*")
            if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file()
        )
        assert found, f"no <split>/<CLASS>/*.jpg under CXR_TEST_DATA_DIR={data_dir}"
        jpeg = folder / f"real-{found[0].name}"
        shutil.copyfile(found[0], jpeg)
    else:
        jpeg = folder / "generated.jpg"
        gradient_image().convert("RGB").save(jpeg, "JPEG", quality=90)

    text = folder / "notes.txt"
    text.write_text("this is not an X-ray\n")
    return {"png": png, "jpeg": jpeg, "text": text}


@pytest.fixture(scope="module")
def cli_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with version 1 written by ``cxr init-model`` (built once per module)."""
    model_dir = tmp_path_factory.mktemp("cli") / "models"
    argv = ["--model-dir", str(model_dir), "init-model", "--base", "none", "--input-size", "32"]
    assert main(argv) == 0
    return model_dir


def test_init_model_writes_version_1(cli_model_dir: Path) -> None:
    assert list_versions(cli_model_dir) == [1]
    meta = read_metadata(cli_model_dir, 1)
    assert meta.class_names == CLASSES
    assert meta.input_size == TINY_SIZE
    assert meta.base_weights is None
    assert meta.extra["trained"] is False
    assert meta.trained is False


def test_init_model_prints_the_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tmp_path / "models"
    argv = ["--model-dir", str(model_dir), "init-model", "--base", "None", "--input-size", "32"]
    argv += ["--classes", " NORMAL, PNEUMONIA ,COVID19,"]  # spaces and empty items are dropped
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "wrote version 1" in out
    assert "UNTRAINED" in out
    assert str(model_dir / "1") in out
    meta = read_metadata(model_dir, 1)
    assert meta.class_names == THREE
    assert meta.version == 1
    assert latest_version(model_dir) == 1


def test_init_model_without_network_says_what_to_do_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13: no 81-line traceback. The download fails as Keras fails offline (no traffic)."""
    from keras.src.applications import vgg16

    def offline(*args: object, **kwargs: object) -> str:
        raise Exception(
            "URL fetch failure on https://storage.googleapis.com/...notop.h5: None -- "
            "[Errno -3] Temporary failure in name resolution"
        )

    monkeypatch.setattr(vgg16.file_utils, "get_file", offline)
    argv = ["--model-dir", str(tmp_path / "m"), "init-model", "--base", "imagenet"]
    assert main([*argv, "--input-size", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--base none" in err and "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in err
    assert not (tmp_path / "m" / "1").exists()


def test_init_model_refuses_bad_arguments(tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    base = ["--model-dir", str(model_dir), "init-model", "--base", "none"]
    with pytest.raises(ValueError, match="input_size"):
        main([*base, "--input-size", "16"])
    with pytest.raises(ValueError, match="two distinct"):
        main([*base, "--input-size", "32", "--classes", "NORMAL"])
    with pytest.raises(FileNotFoundError):
        main(["--model-dir", str(model_dir), "init-model", "--base", str(tmp_path / "no.h5")])
    assert list_versions(model_dir) == []


def test_predict_prints_label_and_probabilities(
    cli_model_dir: Path, images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model-dir", str(cli_model_dir), "predict"]
    code = main([*argv, str(images["png"]), str(images["jpeg"])])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, (images["png"], images["jpeg"]), strict=True):
        assert line.startswith(f"{path}: ")
        label = line.split(": ", 1)[1].split()[0]
        assert label in CLASSES
        for name in CLASSES:
            assert f"{name}=" in line
        assert "[model v1]" in line
        assert line.endswith("UNTRAINED model: not a diagnosis")  # init-model's version


def test_predict_json(
    cli_model_dir: Path, images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model-dir", str(cli_model_dir), "predict", "--json", "--version", "1"]
    code = main([*argv, str(images["png"]), str(images["jpeg"])])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    docs = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert [d["image"] for d in docs] == [str(images["png"]), str(images["jpeg"])]
    for doc in docs:
        assert set(doc) == {
            "image", "label", "probabilities", "model_version", "decision_threshold",
            "model_trained",
        }  # fmt: skip
        assert doc["model_trained"] is False
        assert doc["decision_threshold"] is None  # labels by argmax
        assert doc["model_version"] == 1
        assert list(doc["probabilities"]) == CLASSES
        assert doc["label"] == max(doc["probabilities"], key=doc["probabilities"].__getitem__)
        assert sum(doc["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_predict_bad_image_exits_1(
    cli_model_dir: Path, images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    missing = images["png"].parent / "missing.png"
    argv = ["--model-dir", str(cli_model_dir), "predict", "--json"]
    code = main([*argv, str(images["text"]), str(images["png"]), str(missing)])
    captured = capsys.readouterr()
    assert code == 1
    # The good image in between is still classified.
    docs = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert [d["image"] for d in docs] == [str(images["png"])]
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2
    assert errors[0].startswith(f"{images['text']}: error: ")
    assert "not a PNG or JPEG" in errors[0]
    assert errors[1].startswith(f"{missing}: error: ")


def test_predict_without_model_exits_2(
    tmp_path: Path, images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--model-dir", str(tmp_path / "empty"), "predict", str(images["png"])])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "init-model" in captured.err
    assert str(tmp_path / "empty") in captured.err


def test_model_dir_from_environment(
    tiny_model_dir: Path,
    images: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("CXR_MODEL_DIR", str(tiny_model_dir))
    assert main(["predict", "--json", str(images["png"])]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model_version"] == 1


def test_versions_lists_versions(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "models"
    for v in (1, 2):
        shutil.copytree(tiny_model_dir / "1", model_dir / str(v))
    assert main(["--model-dir", str(model_dir), "versions"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["1", "2"]
    for line in lines:
        fields = line.split("\t")
        assert fields[2] == f"{TINY_SIZE}px"
        assert fields[3] == ",".join(CLASSES)
        assert fields[4] == "None"
        assert fields[5] == "gate: none"
        assert fields[6] == "UNTRAINED"  # a bare save of a freshly built model


def test_versions_of_empty_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model-dir", str(tmp_path), "versions"]) == 0
    assert "no model versions" in capsys.readouterr().out


def test_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "required" in capsys.readouterr().err


def test_calibrate_publishes_the_weights_again_with_a_threshold(
    cli_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same weights as a new candidate version that labels at a val-chosen threshold."""
    model_dir = tmp_path / "models"
    shutil.copytree(cli_model_dir, model_dir)
    data = make_dataset(tmp_path / "data", counts={"train": 6, "val": 30, "test": 6})
    argv = ["--model-dir", str(model_dir), "calibrate", "1", "--dataset", str(data)]
    code = main([*argv, "--target-sensitivity", "0.9"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "wrote version 2" in captured.out and "cxr promote 2" in captured.out
    meta = read_metadata(model_dir, 2)
    assert meta.parent_version == 1 and meta.extra == {"calibrated_from": 1}
    assert meta.trained is False  # new labels on init-model's untrained weights
    assert isinstance(meta.decision_threshold, float)
    assert meta.hyperparameters["target_sensitivity"] == 0.9
    assert set(meta.metrics) == {"accuracy", "sensitivity", "specificity", "roc_auc"}
    assert (model_dir / "2" / "evaluation.json").is_file()

    image = data / "test" / "NORMAL" / "normal-000.jpg"
    assert main(["--model-dir", str(model_dir), "predict", "--version", "2", str(image)]) == 0
    assert f"threshold {meta.decision_threshold:.3f}]" in capsys.readouterr().out

    wrong = make_dataset(tmp_path / "three", classes=THREE)
    assert main([*argv[:4], "--dataset", str(wrong)]) == 2
    assert "classes" in capsys.readouterr().err
    assert main(["--model-dir", str(model_dir), "calibrate", "9", "--dataset", str(data)]) == 2
