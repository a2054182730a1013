"""The admin commands of ``cxr`` against a real web app over real HTTP (real Redis, no worker),
and the local ``import`` / ``init-model`` activation rule."""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import keras
import pytest
import redis
from werkzeug.serving import BaseWSGIServer, make_server

from cli.main import main
from ml.model import build_classifier
from ml.versions import list_versions, read_active_file, read_metadata
from tests.conftest import CLASSES, EVALUATION, TINY_SIZE, free_port, make_settings
from worker.client import Keys
from worker.settings import Settings

TOKEN = "s3cret-admin-token-for-tests"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def serve(settings: Settings) -> tuple[BaseWSGIServer, threading.Thread]:
    """Serve the web app for ``settings`` on a free loopback port in a thread."""
    from web import create_app

    app = create_app({"TESTING": True, "CXR_SETTINGS": settings})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def live(
    redis_url: str, redis_client: redis.Redis, model_dir: Path
) -> Iterator[tuple[str, Settings]]:
    """The admin-enabled app served over HTTP: its base URL and settings."""
    settings = make_settings(
        redis_url, model_dir, admin_token=TOKEN, training_queue=f"training-{uuid.uuid4().hex[:8]}"
    )
    server, thread = serve(settings)
    yield f"http://127.0.0.1:{server.server_port}", settings
    server.shutdown()
    thread.join(10)
    server.server_close()
    for key in redis_client.scan_iter(match=f"{settings.key_prefix}:*"):
        redis_client.delete(key)
    redis_client.delete(settings.training_queue)


def cxr(
    capsys: pytest.CaptureFixture[str], url: str, *args: str, token: str | None = TOKEN
) -> tuple[int, str, str]:
    """Run ``cxr --api-url URL [--token T] ARGS`` and return (exit code, stdout, stderr)."""
    argv = ["--api-url", url, *(["--token", token] if token is not None else []), *args]
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _no_admin_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CXR_ADMIN_TOKEN", "CXR_API_URL", "CXR_ACTOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("USER", "tester")


# --- models and the active pointer --------------------------------------------------------------


def test_models_table_and_json(
    live: tuple[str, Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live
    code, out, err = cxr(capsys, url, "models")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["VERSION", "ACTIVE", "CREATED", "BASE", "INPUT", "ACC", "SENS",
                                "SPEC", "AUC", "GATE"]  # fmt: skip
    assert lines[1].split()[-1] == "none"  # the tiny versions were published without a dataset
    assert [line.split()[0] for line in lines[1:3]] == ["2", "1"]
    assert "v1" in lines[1] and "0.950" in lines[1] and f"{TINY_SIZE}px" in lines[1]
    assert "UNTRAINED" not in lines[1] and lines[2].split()[:2] == ["1", "UNTRAINED"]
    assert "no active version" in lines[-1]

    code, out, _ = cxr(capsys, url, "models", "--json")  # --json after the subcommand too
    assert code == 0
    doc = json.loads(out)
    assert doc["active_version"] is None
    assert [v["version"] for v in doc["versions"]] == [2, 1]


def test_model_detail(live: tuple[str, Settings], capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = live
    code, out, err = cxr(capsys, url, "model", "2")
    assert code == 0, err
    assert "version:   2" in out
    assert "parent:    version 1" in out
    assert f"roc_auc: {EVALUATION['roc_auc']:.3f}" in out
    assert f"classes:   {', '.join(CLASSES)}" in out
    assert "OOD gate:  none" in out
    code, out, err = cxr(capsys, url, "model", "2", "--card")
    assert code == 0, err
    assert out.startswith("# Model card: cxr version 2")
    assert "## Out-of-distribution gate" in out and "gate: none" in out
    assert f"| roc_auc | {EVALUATION['roc_auc']:.4g} |" in out
    assert "UNTRAINED" not in out
    code, out, err = cxr(capsys, url, "model", "1")
    assert code == 0, err
    assert "UNTRAINED: never fine-tuned; its answers are not a diagnosis" in out
    code, out, err = cxr(capsys, url, "model", "9")
    assert code == 1
    assert out == ""
    assert "no model version 9" in err
    assert "HTTP 404" in err


def test_promote_pin_rollback_audit(
    live: tuple[str, Settings],
    redis_client: redis.Redis,
    model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, settings = live
    code, out, err = cxr(capsys, url, "--actor", "ops", "promote", "2", "--reason", "better")
    assert code == 0, err
    assert out.strip() == "version 2 is now active (promote by admin:ops; was none)"
    assert redis_client.get(Keys(settings.key_prefix).active_version()) == b"2"
    assert read_active_file(model_dir) == 2

    code, out, _ = cxr(capsys, url, "pin", "1")
    assert code == 0
    assert out.strip() == "version 1 is now active (pin by admin:tester; was 2)"

    code, out, _ = cxr(capsys, url, "rollback")
    assert code == 0
    assert out.strip() == "rolled back: version 2 is now active (rollback by admin:tester; was 1)"

    code, out, err = cxr(capsys, url, "rollback")
    assert code == 1
    assert "no previous active version" in err
    assert "HTTP 409" in err

    code, out, _ = cxr(capsys, url, "audit")
    assert code == 0
    rows = out.strip().splitlines()
    assert rows[0].split() == ["WHEN", "BY", "ACTION", "FROM", "TO", "REASON"]
    assert [r.split()[3] for r in rows[1:]] == ["rollback", "pin", "promote"]
    assert rows[-1].rstrip().endswith("better")

    code, out, _ = cxr(capsys, url, "--json", "audit", "--limit", "1")
    assert [e["action"] for e in json.loads(out)["entries"]] == ["rollback"]

    code, out, _ = cxr(capsys, url, "models")
    assert out.splitlines()[1].split()[:2] == ["2", "*"]


def test_promote_unknown_version(
    live: tuple[str, Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cxr(capsys, live[0], "promote", "7")
    assert (code, out) == (1, "")
    assert "no model version 7" in err


# --- fine-tuning jobs ---------------------------------------------------------------------------


def test_train_jobs_job_cancel(
    live: tuple[str, Settings], redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    url, settings = live
    args = ["train", "--dataset", "small", "--input-size", "32", "--epochs-head", "1"]
    more = ["--patience", "2", "--seed", "7", "--no-augment"]
    code, out, err = cxr(
        capsys, url, *args, *more, "--epochs-finetune", "0", "--promotion", "never"
    )
    assert code == 0, err
    job_id = out.strip()
    assert JOB_ID.match(job_id)
    assert redis_client.llen(settings.training_queue) == 1

    code, out, _ = cxr(capsys, url, "jobs")
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split()[:4] == ["ID", "STATUS", "CREATED", "BY"]
    assert row.split()[:2] == [job_id, "queued"]
    assert "admin:tester" in row

    code, out, _ = cxr(capsys, url, "job", job_id)
    assert code == 0
    assert f"id:        {job_id}" in out
    assert "status:    queued" in out
    for param in ("dataset=small", "input_size=32", "epochs_finetune=0", "promotion=never",
                  "patience=2", "seed=7", "augment=False"):  # fmt: skip
        assert param in out

    code, out, _ = cxr(capsys, url, "cancel", job_id)
    assert (code, out.strip()) == (0, f"cancelled job {job_id}")
    code, out, err = cxr(capsys, url, "cancel", job_id)
    assert code == 1
    assert "already cancelled" in err

    code, out, _ = cxr(capsys, url, "--json", "job", job_id)
    assert json.loads(out)["status"] == "cancelled"
    code, out, err = cxr(capsys, url, "job", "0" * 32)
    assert code == 1
    assert "no training job" in err


def test_train_refuses_invalid_parameters(
    live: tuple[str, Settings], redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    url, settings = live
    code, out, err = cxr(capsys, url, "train", "--epochs-head", "0", "--epochs-finetune", "0")
    assert (code, out) == (1, "")
    assert "HTTP 400" in err
    assert "epochs_finetune:" in err
    code, out, err = cxr(capsys, url, "train", "--base", "active")
    assert code == 1
    assert "needs an active model version" in err
    assert redis_client.llen(settings.training_queue) == 0


def test_train_wait_follows_the_job(
    live: tuple[str, Settings],
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, settings = live
    keys = Keys(settings.key_prefix)

    def progress(epoch: int, batch: int | None = None) -> dict[str, str]:
        # As the trainer writes it: after an epoch, or inside one (batch of batches).
        doc = {"stage": "training", "phase": 1, "epoch": epoch, "total_epochs": 2,
               "metrics": {"val_auc": 0.5 + epoch / 10}, "eta_seconds": 2 - epoch}  # fmt: skip
        if batch is not None:
            doc |= {"batch": batch, "batches": 4, "metrics": {}, "eta_seconds": 8}
        return {"status": "running", "progress": json.dumps(doc)}

    outcome = {"version": 3, "promoted": False, "reason": "policy is never"}
    states = iter(
        [
            progress(1, batch=1),
            progress(1),
            progress(1),
            progress(2),
            {"status": "done", "outcome": json.dumps(outcome)},
        ]
    )

    def trainer_step(seconds: float) -> None:
        # Plays the trainer between two polls of the CLI: one step further each time.
        assert seconds == 0.05
        (job_id,) = redis_client.zrange(keys.training_index(), 0, -1)
        redis_client.hset(keys.training_job(job_id.decode()), mapping=next(states))

    monkeypatch.setattr("cli.admin.time", SimpleNamespace(sleep=trainer_step))
    code, out, err = cxr(capsys, url, "train", "--wait", "--poll-seconds", "0.05")
    assert code == 0, err
    job_id, *lines = out.strip().splitlines()
    assert JOB_ID.match(job_id)
    # One line per change, not per poll.
    assert lines == [
        "queued: waiting for a trainer",
        "running: phase 1  epoch 1/2  batch 1/4  (12%)  eta 8s",
        "running: phase 1  epoch 1/2  (50%)  val_auc=0.600  eta 1s",
        "running: phase 1  epoch 2/2  (100%)  val_auc=0.700  eta 0s",
        "done: version 3, not promoted, policy is never",
    ]


def test_train_wait_exits_1_when_the_job_fails(
    live: tuple[str, Settings],
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = Keys(live[1].key_prefix)

    def trainer_step(seconds: float) -> None:
        job_id = redis_client.zrevrange(keys.training_index(), 0, 0)[0]
        failed = {"status": "failed", "error": "dataset 'x' not found"}
        redis_client.hset(keys.training_job(job_id.decode()), mapping=failed)

    monkeypatch.setattr("cli.admin.time", SimpleNamespace(sleep=trainer_step))
    code, out, _ = cxr(capsys, live[0], "train", "--dataset", "x", "--wait")
    assert code == 1
    assert out.strip().splitlines()[-1] == "failed: dataset 'x' not found"
    # With --json, one document: the job as it ended.
    code, out, _ = cxr(capsys, live[0], "--json", "train", "--dataset", "x", "--wait")
    assert code == 1
    assert json.loads(out)["status"] == "failed"


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["models"], ["promote", "1"], ["train"], ["audit"]])
def test_wrong_token_exits_1(
    live: tuple[str, Settings], capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    code, out, err = cxr(capsys, live[0], *command, token="wrong")
    assert (code, out) == (1, "")
    assert "missing or wrong admin token" in err
    assert "HTTP 401" in err


def test_missing_token_says_how_to_give_one(
    live: tuple[str, Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cxr(capsys, live[0], "models", token=None)
    assert code == 1
    assert "CXR_ADMIN_TOKEN" in err


def test_url_and_token_from_the_environment(
    live: tuple[str, Settings], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CXR_API_URL", live[0] + "/")
    monkeypatch.setenv("CXR_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("CXR_ACTOR", "from-env")
    assert main(["promote", "1"]) == 0
    assert "promote by admin:from-env" in capsys.readouterr().out


def test_disabled_admin_api(
    redis_url: str, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, thread = serve(make_settings(redis_url, model_dir))
    try:
        code, _, err = cxr(capsys, f"http://127.0.0.1:{server.server_port}", "models")
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
    assert code == 1
    assert "set CXR_ADMIN_TOKEN to enable the admin API" in err
    assert "HTTP 403" in err


def test_unreachable_api_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = cxr(capsys, url, "models")
    assert (code, out) == (2, "")
    assert f"cannot reach the cxr API at {url}" in err


def test_api_url_must_be_http(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cxr(capsys, "file:///etc", "models")
    assert code == 2
    assert "http(s)" in err


# --- local: import and the first active version -------------------------------------------------


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A compatible tiny classifier and an incompatible (RGB input) model, saved as .keras."""
    folder = tmp_path_factory.mktemp("saved")
    keras.utils.set_random_seed(3)
    good = folder / "tiny.keras"
    build_classifier(CLASSES, TINY_SIZE, None).save(good)
    rgb = keras.Sequential(
        [keras.Input((TINY_SIZE, TINY_SIZE, 3)), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    bad = folder / "rgb.keras"
    rgb.save(bad)
    return {"good": good, "bad": bad}


def test_import_activates_the_first_version_only(
    saved_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "models"
    base = ["--model-dir", str(model_dir), "import", str(saved_models["good"])]
    assert main([*base, "--classes", "NORMAL,PNEUMONIA", "--note", "from a notebook"]) == 0
    out = capsys.readouterr().out
    assert f"imported {saved_models['good']} as version 1 ({TINY_SIZE}px)" in out
    assert "version 1 is now the active version" in out
    assert read_active_file(model_dir) == 1
    meta = read_metadata(model_dir, 1)
    assert meta.class_names == CLASSES
    assert meta.extra["note"] == "from a notebook"
    assert meta.trained is True  # an imported model was trained elsewhere

    assert main([*base, "--classes", "NORMAL,PNEUMONIA"]) == 0
    out = capsys.readouterr().out
    assert "as version 2" in out
    assert "version 2 is a candidate; version 1 stays active" in out
    assert read_active_file(model_dir) == 1

    assert main([*base, "--classes", "NORMAL,PNEUMONIA", "--untrained"]) == 0
    assert f"as version 3 ({TINY_SIZE}px, UNTRAINED)" in capsys.readouterr().out
    assert read_metadata(model_dir, 3).trained is False


@pytest.mark.parametrize(
    ("which", "classes", "message"),
    [
        ("bad", "NORMAL,PNEUMONIA", "(batch, S, S, 1)"),
        ("good", "NORMAL,PNEUMONIA,COVID19", "output must be (batch, 3)"),
        ("good", "NORMAL", "at least two distinct"),
        ("missing", "NORMAL,PNEUMONIA", "no such file"),
    ],
)
def test_import_refuses_incompatible_models(
    saved_models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    which: str,
    classes: str,
    message: str,
) -> None:
    source = saved_models.get(which, tmp_path / "missing.keras")
    model_dir = tmp_path / "models"
    code = main(["--model-dir", str(model_dir), "import", str(source), "--classes", classes])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert message in captured.err
    assert list_versions(model_dir) == []
    assert read_active_file(model_dir) is None


def test_init_model_activates_the_first_version_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "models"
    argv = ["--model-dir", str(model_dir), "init-model", "--base", "none", "--input-size", "32"]
    assert main(argv) == 0
    assert "version 1 is now the active version" in capsys.readouterr().out
    assert read_active_file(model_dir) == 1
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "wrote version 2" in out
    assert (
        "version 2 is a candidate; version 1 stays active (promote it with `cxr promote 2`)" in out
    )
    assert read_active_file(model_dir) == 1
