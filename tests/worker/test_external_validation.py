"""External validation end to end: evaluation sets registered through the configuration and the
admin API, a real trainer publishing and scoring versions on them, the promotion gate blocking a
candidate with the set named, the warning rule, the API, ``cxr model``, ``cxr evaluate`` and
``cxr import``. Real Redis, a real trainer process, real HTTP for the CLI."""

from __future__ import annotations

import io
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image
from werkzeug.serving import make_server

from cli.main import main
from ml.external import read_external, sensitivity_warning, write_external
from ml.versions import version_dir
from tests.conftest import WorkerProcess, make_settings, start_trainer
from tests.worker.test_training_jobs import QUICK, jobs_of, synthetic_dataset, wait_final
from worker.client import Keys
from worker.registry import ActiveVersion
from worker.settings import Settings

pytestmark = pytest.mark.integration

TOKEN = "s3cret-admin-token-for-tests"
KAGGLE_TEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "cxr-kaggle-test-256"
PAIRS = 6


def png(value: int) -> bytes:
    rng = np.random.default_rng(value)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 48)).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def source_images() -> list[bytes]:
    """A few X-rays from the test data when available (else noise images)."""
    real = os.environ.get("CXR_TEST_DATA_DIR")
    if real:
        files = sorted((Path(real) / "test").glob("*/*.jpeg"))[::40][:PAIRS]
        if len(files) == PAIRS:
            return [f.read_bytes() for f in files]
    return [png(i) for i in range(PAIRS)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """``(CXR_DATA_DIR, training dataset, the configured evaluation set)``.

    CXR_DATA_DIR holds the training set (a link to the real one, else synthetic) and ``pairs``:
    every image twice, once as NORMAL and once as PNEUMONIA, so no model can rank it perfectly
    (each pair ties): its ROC AUC is below 1 whatever the model, which the gate test relies on.
    The configured set is cxr-kaggle-test-256 when it is there (a test set only), else a copy of
    the synthetic test split.
    """
    root = tmp_path_factory.mktemp("data")
    real = os.environ.get("CXR_TEST_DATA_DIR")
    if real:
        (root / "train-set").symlink_to(Path(real).resolve())
    else:
        synthetic_dataset(root / "train-set")
    for name in ("NORMAL", "PNEUMONIA"):
        (root / "pairs" / name).mkdir(parents=True)
        for i, data in enumerate(source_images()):
            (root / "pairs" / name / f"img-{i}.png").write_bytes(data)
    configured = KAGGLE_TEST if KAGGLE_TEST.is_dir() else root / "train-set" / "test"
    return root, "train-set", configured


@pytest.fixture(scope="module")
def trainer_env(
    redis_url: str, tiny_model_dir: Path, data: tuple[Path, str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Settings, WorkerProcess]]:  # fmt: skip
    """A real trainer on a copy of the tiny model folder, with one configured evaluation set."""
    model_dir = tmp_path_factory.mktemp("trainer") / "models"
    shutil.copytree(tiny_model_dir, model_dir)
    settings = make_settings(
        redis_url, model_dir, data_dir=data[0], eval_datasets=f"kaggle={data[2]}",
        admin_token=TOKEN, precision="float32",
    )  # fmt: skip
    worker = start_trainer(settings, tmp_path_factory.mktemp("logs"))
    yield settings, worker
    worker.stop()
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{settings.key_prefix}:*"):
        client.delete(key)


@pytest.fixture(scope="module")
def api_url(trainer_env: tuple[Settings, WorkerProcess]) -> Iterator[str]:
    """The web app on the trainer's settings, served over HTTP on loopback."""
    from web import create_app

    app = create_app({"TESTING": True, "CXR_SETTINGS": trainer_env[0]})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)
    server.server_close()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def check_external(doc: dict[str, Any], name: str, version: int) -> None:
    """A stored external evaluation has every figure, with intervals around it."""
    assert doc["dataset"] == name and doc["version"] == version and "error" not in doc, doc
    assert doc["n"] == sum(doc["counts"].values()) == sum(map(sum, doc["confusion_matrix"]))
    for key in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        lo, hi = doc[f"{key}_ci"]
        assert 0 <= lo <= doc[key] <= hi <= 1, (key, doc)
    assert doc["target_sensitivity"] == 1.0


def test_every_version_is_scored_on_every_set_and_the_gate_names_the_set_that_blocks(
    trainer_env: tuple[Settings, WorkerProcess], data: tuple[Path, str, Path], api_url: str,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:  # fmt: skip
    settings, worker = trainer_env
    monkeypatch.delenv("CXR_ADMIN_TOKEN", raising=False)
    admin = ["--api-url", api_url, "--token", TOKEN]

    # An evaluation set registered through the admin API (by the CLI), beside the configured one.
    code, out = cli(capsys, "eval-datasets", *admin, "--add", "pairs", "pairs")
    assert code == 0 and "registered evaluation set pairs" in out, out
    code, out = cli(capsys, "eval-datasets", *admin, "--add", "gone", "no-such-folder")
    assert code == 1 and "no folder" in out and "HTTP 422" in out, out
    code, out = cli(capsys, "eval-datasets", *admin)
    assert "kaggle" in out and "config" in out and "pairs" in out and "admin" in out, out

    # 1. A trained version is scored on both sets at its own threshold and stores the results.
    jobs = jobs_of(settings)
    active = ActiveVersion(jobs.redis, Keys(settings.key_prefix), settings.model_dir)
    quick = QUICK | {"dataset": data[1], "target_sensitivity": 1.0}
    job = jobs.submit(jobs_request(quick | {"promotion": "always"}), "test")
    doc = wait_final(jobs, job)
    assert doc["status"] == "done", (doc, worker.log()[-3000:])
    first = doc["outcome"]["version"]
    assert active.get() == first
    stored = read_external(settings.model_dir, first)
    assert set(stored) == {"kaggle", "pairs"}
    for name, ext in stored.items():
        check_external(ext, name, first)
    assert stored["pairs"]["n"] == 2 * PAIRS and stored["pairs"]["roc_auc"] < 1
    assert set(doc["outcome"]["external"]) == {"kaggle", "pairs"}
    assert (version_dir(settings.model_dir, first) / "external" / "kaggle.json").is_file()

    # The API and `cxr model` show them, with the warning exactly where the rule says.
    code, out = cli(capsys, "model", *admin, str(first))
    assert code == 0 and "external evaluation" in out, out
    api_doc = main_json(capsys, "model", *admin, str(first))
    for name, ext in stored.items():
        expected = sensitivity_warning({"dataset": name, **ext})
        assert api_doc["external"][name]["warning"] == expected
        assert f"{name} (n={ext['n']}): accuracy" in out
        assert (f"WARNING: {expected}" in out) == (expected is not None)
    rows = main_json(capsys, "models", *admin)["versions"]
    assert set(next(r for r in rows if r["version"] == first)["external"]) == {"kaggle", "pairs"}

    # 2. The active version did perfectly on `pairs` (recorded as if so: no model can, by
    # construction); a candidate continued from it at a negligible learning rate equals it on
    # the run's test split, so if_better would promote it -- the gate blocks it, naming `pairs`.
    write_external(settings.model_dir, first, "pairs",
                   stored["pairs"] | {"roc_auc": 1.0, "sensitivity": 1.0})  # fmt: skip
    (version_dir(settings.model_dir, first) / "external" / "kaggle.json").unlink()
    same = quick | {"base": "active", "learning_rate_head": 1e-12, "epochs_finetune": 0}
    job2 = jobs.submit(
        jobs_request(same | {"promotion": "if_better", "external_tolerance": 0.0}), "test"
    )
    doc2 = wait_final(jobs, job2)
    assert doc2["status"] == "done", (doc2, worker.log()[-3000:])
    promotion = doc2["outcome"]["promotion"]
    assert promotion["promoted"] is False, promotion
    assert promotion["external"]["blocked_by"] == "pairs", promotion
    assert "blocked by evaluation set 'pairs'" in promotion["reason"]
    assert active.get() == first
    # A set the active version had no score on (kaggle, removed above) was scored for the gate.
    assert "kaggle" in read_external(settings.model_dir, first)
    code, out = cli(capsys, "job", *admin, job2)
    assert "pairs" in out, out

    # 3. `cxr evaluate N --dataset D`: a configured name, or a folder (stored under --name).
    second = doc2["outcome"]["version"]
    local = ["--model-dir", str(settings.model_dir)]
    monkeypatch.setenv("CXR_EVAL_DATASETS", f"kaggle={data[2]}")
    code, out = cli(capsys, *local, "evaluate", str(second), "--dataset", "kaggle")
    assert code == 0 and f"version {second} on {data[2]}" in out and "roc_auc" in out, out
    pairs = data[0] / "pairs"
    code, out = cli(capsys, *local, "evaluate", str(second), "--dataset", str(pairs),
                    "--name", "pairs-again")  # fmt: skip
    assert code == 0, out
    check_external(read_external(settings.model_dir, second)["pairs-again"], "pairs-again", second)
    code, out = cli(capsys, *local, "evaluate", str(second), "--dataset", "nowhere")
    assert code == 2 and "neither a folder nor a set" in out

    # 4. `cxr import` scores the configured sets too.
    elsewhere = tmp_path / "models"
    model_file = version_dir(settings.model_dir, second) / "model.keras"
    code, out = cli(capsys, "--model-dir", str(elsewhere), "import", str(model_file),
                    "--classes", "NORMAL,PNEUMONIA")  # fmt: skip
    assert code == 0 and "kaggle (n=" in out, out
    imported = read_external(elsewhere, 1)["kaggle"]
    assert imported["target_sensitivity"] is None and imported["threshold"] is None  # argmax
    assert imported["n"] == read_external(settings.model_dir, second)["kaggle"]["n"]


def jobs_request(params: dict[str, Any]) -> Any:
    from worker.jobs import TrainingRequest

    return TrainingRequest(**params)


def main_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    import json

    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)
