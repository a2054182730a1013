"""Evaluation sets through the admin API (register, list, remove) and the external evaluations
and warnings a version's JSON carries; Flask's test client, a real Redis, no worker."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient

from ml.external import write_external
from tests.conftest import make_settings
from tests.web.conftest import assert_error
from tests.web.test_admin import TOKEN, call, ok_json
from worker.evalsets import MAX_EVAL_DATASETS
from worker.settings import Settings


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for name in ("NORMAL", "PNEUMONIA"):
        (root / "site-a" / name).mkdir(parents=True)
    return root


@pytest.fixture
def sets_settings(
    redis_url: str, redis_client: redis.Redis, model_dir: Path, data_dir: Path
) -> Iterator[Settings]:
    settings = make_settings(
        redis_url, model_dir, admin_token=TOKEN, data_dir=data_dir,
        eval_datasets="kaggle=/elsewhere/kaggle-test",
    )  # fmt: skip
    yield settings
    for key in redis_client.scan_iter(match=f"{settings.key_prefix}:*"):
        redis_client.delete(key)


@pytest.fixture
def admin(sets_settings: Settings) -> FlaskClient:
    from web import create_app

    return create_app({"TESTING": True, "CXR_SETTINGS": sets_settings}).test_client()


def test_register_list_and_remove(admin: FlaskClient) -> None:
    doc = ok_json(call(admin, "PUT", "/eval-datasets/site-a", {"path": "site-a"}), 201)
    assert doc["name"] == "site-a" and doc["path"] == "site-a" and doc["actor"] == "admin"
    ok_json(call(admin, "PUT", "/eval-datasets/site-a", {"path": "site-a/"}), 200)
    listed = ok_json(call(admin, "GET", "/eval-datasets"))["datasets"]
    assert [(d["name"], d["path"], d["source"]) for d in listed] == [
        ("kaggle", "/elsewhere/kaggle-test", "config"), ("site-a", "site-a/", "admin")]  # fmt: skip
    response = call(admin, "DELETE", "/eval-datasets/site-a")
    assert response.status_code == 204
    assert_error(call(admin, "DELETE", "/eval-datasets/site-a"), 404, "not_found")
    assert [d["name"] for d in ok_json(call(admin, "GET", "/eval-datasets"))["datasets"]] == [
        "kaggle"
    ]


def test_a_missing_folder_is_refused_where_web_sees_the_data(
    admin: FlaskClient, data_dir: Path
) -> None:
    body = assert_error(
        call(admin, "PUT", "/eval-datasets/x", {"path": "nope"}), 422, "dataset_not_found"
    )
    assert body["message"] == (
        f"no folder 'nope' in CXR_DATA_DIR ({data_dir}): name one holding <CLASS>/<images> or "
        "test/<CLASS>/<images>"
    )


def test_a_path_that_cannot_be_checked_is_registered_with_a_warning(
    admin: FlaskClient, data_dir: Path
) -> None:
    shutil.rmtree(data_dir)  # CXR_DATA_DIR not mounted in the web container
    doc = ok_json(call(admin, "PUT", "/eval-datasets/x", {"path": "nope"}), 201)
    assert doc["path"] == "nope" and doc["warning"] == (
        f"CXR_DATA_DIR ({data_dir}) is not visible to the web process, so the path was not "
        "checked; a set the trainer cannot read is recorded as an error with each version"
    )


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("ok", {"path": "/etc"}),
        ("ok", {"path": "../site-a"}),
        ("ok", {"path": ""}),
        ("ok", {"path": "x" * 256}),
        ("ok", {"path": 3}),
        ("ok", {}),
        ("ok", {"path": "site-a", "extra": 1}),
        (".hidden", {"path": "site-a"}),
        ("x" * 65, {"path": "site-a"}),
    ],
)
def test_names_and_paths_are_bounded(
    admin: FlaskClient, name: str, body: dict[str, object]
) -> None:
    assert_error(call(admin, "PUT", f"/eval-datasets/{name}", body), 400, "invalid_request")


def test_configured_sets_are_changed_in_the_configuration(admin: FlaskClient) -> None:
    assert_error(call(admin, "PUT", "/eval-datasets/kaggle", {"path": "site-a"}), 409, "configured")
    assert_error(call(admin, "DELETE", "/eval-datasets/kaggle"), 409, "configured")


def test_the_number_of_sets_is_bounded(admin: FlaskClient, sets_settings: Settings) -> None:
    for i in range(MAX_EVAL_DATASETS):
        ok_json(call(admin, "PUT", f"/eval-datasets/s{i}", {"path": "site-a"}), 201)
    assert_error(call(admin, "PUT", "/eval-datasets/one-more", {"path": "site-a"}), 409, "too_many")


def test_versions_carry_their_external_evaluations_and_warnings(
    admin: FlaskClient, model_dir: Path
) -> None:
    short = {"n": 100, "sensitivity": 0.59, "sensitivity_ci": [0.5, 0.68], "roc_auc": 0.92,
             "roc_auc_ci": [0.9, 0.94], "target_sensitivity": 0.95, "threshold": 0.2,
             "confusion_matrix": [[40, 2], [23, 35]]}  # fmt: skip
    write_external(model_dir, 2, "kaggle", short)
    write_external(model_dir, 2, "site-a", short | {"sensitivity_ci": [0.5, 0.96]})
    write_external(model_dir, 2, "broken", {"dataset": "broken", "error": "no folder"})
    rows = {v["version"]: v for v in ok_json(call(admin, "GET", "/models"))["versions"]}
    assert rows[1]["external"] == {}
    ext = rows[2]["external"]
    assert set(ext) == {"broken", "kaggle", "site-a"}
    assert "below the target 0.950" in ext["kaggle"]["warning"]
    assert ext["site-a"]["warning"] is None and ext["broken"]["error"] == "no folder"
    assert "confusion_matrix" not in ext["kaggle"]  # the list carries the headline figures
    detail = ok_json(call(admin, "GET", "/models/2"))["external"]
    assert detail["kaggle"]["confusion_matrix"] == [[40, 2], [23, 35]]
    assert detail["kaggle"]["warning"] == ext["kaggle"]["warning"]
    # The published metadata is never rewritten by an external evaluation.
    assert "external" not in json.loads((model_dir / "2" / "metadata.json").read_text())


def test_a_version_without_a_recorded_target_uses_its_hyperparameter(
    admin: FlaskClient, model_dir: Path
) -> None:
    meta_path = model_dir / "2" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["hyperparameters"] = {"target_sensitivity": 0.9}
    meta_path.write_text(json.dumps(meta))
    write_external(model_dir, 2, "kaggle", {"sensitivity": 0.5, "sensitivity_ci": [0.4, 0.6]})
    ext = ok_json(call(admin, "GET", "/models/2"))["external"]["kaggle"]
    assert "below the target 0.900" in ext["warning"]
