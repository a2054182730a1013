"""Fuzzing every operation of the OpenAPI document against the live stack (Schemathesis).

gunicorn, a real Redis and a real inference worker serving the tiny model (versions 1 and 2, so
promote/pin/rollback really swap); the admin token is configured and sent. Fine-tuning jobs the
fuzzer submits stay queued: no trainer consumes this test's training queue. Bounded: a fixed
number of examples per operation, derandomised (the same cases every run), ~1 min in all.
Afterwards the service must still be ready and classify a normal upload.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import (
    EVALUATION,
    WorkerProcess,
    curves_png,
    link_model,
    make_settings,
    start_worker,
    wait_for,
)
from tests.e2e.conftest import gunicorn
from tests.web.conftest import png
from worker.settings import Settings

TOKEN = "fuzz-admin-token-0123456789"
# Per operation; CXR_FUZZ_EXAMPLES raises it for a longer hunt.
MAX_EXAMPLES = int(os.environ.get("CXR_FUZZ_EXAMPLES", "12"))


@pytest.fixture(scope="module")
def fuzz_settings(
    redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """Settings of their own: a registry with two loadable versions, a data folder, a token."""
    root = tmp_path_factory.mktemp("fuzz")
    models = root / "models"
    for version in ("1", "2"):
        shutil.copytree(tiny_model_dir / "1", models / version, copy_function=link_model)
    meta_path = models / "2" / "metadata.json"
    meta = json.loads(meta_path.read_text()) | {"version": 2, "parent_version": 1}
    meta_path.write_text(json.dumps(meta))
    (models / "2" / "evaluation.json").write_text(json.dumps(EVALUATION))
    (models / "2" / "curves.png").write_bytes(curves_png())
    (models / "active.json").write_text(json.dumps({"version": 1}))
    (root / "data" / "set" / "train" / "NORMAL").mkdir(parents=True)
    found = make_settings(redis_url, models, admin_token=TOKEN, data_dir=root / "data")
    yield found
    client = redis.Redis.from_url(redis_url)
    stale = list(client.scan_iter(match=f"{found.key_prefix}:*"))
    stale += [found.training_queue, found.inference_queue]
    client.delete(*stale)


@pytest.fixture(scope="module")
def fuzz_worker(
    fuzz_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One inference process (threads pool) serving this registry."""
    worker = start_worker(
        fuzz_settings, tmp_path_factory.mktemp("fuzz-logs"), concurrency=4, pool="threads"
    )
    try:
        wait_for(worker.serving, 120, "the fuzz worker to serve")
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def fuzz_url(
    fuzz_settings: Settings, fuzz_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """gunicorn in front of that worker."""
    with gunicorn(fuzz_settings, tmp_path_factory.mktemp("fuzz-web")) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(fuzz_url: str) -> Any:
    """The document as the live app serves it."""
    return schemathesis.openapi.from_url(f"{fuzz_url}/api/v1/openapi.json")


def excluded(case: schemathesis.Case) -> list[Any]:
    """Checks that cannot hold for an operation.

    An upload's schema says "bytes": whether they are an X-ray no schema can say, so random
    bytes are rightly refused (400/413/415) though they match it. Likewise a job's ``dataset``:
    a schema-valid name of a folder that is not there is refused with the documented 422, and
    so is an evaluation set's ``path``.
    """
    state_dependent = {
        ("POST", "/api/v1/predictions"),
        ("POST", "/api/v1/admin/training-jobs"),
        ("PUT", "/api/v1/admin/eval-datasets/{name}"),
    }
    if (case.operation.method.upper(), case.operation.path) in state_dependent:
        return [positive_data_acceptance]
    return []


@pytest.mark.timeout(300)
def test_every_operation_keeps_its_contract(api_schema: Any, fuzz_url: str) -> None:
    # Each operation gets two bounded Hypothesis runs (requests that fit the document, and requests
    # that do not and must be refused with a 4xx); failures are collected, not stopped at,
    # so one run reports every operation that breaks its contract.
    failures: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    started = time.monotonic()
    runs = [(op, mode) for op in operations for mode in GenerationMode]
    for operation, mode in runs:

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: schemathesis.Case) -> None:
            # No 5xx, and every status, header and body as the document says.
            case.call_and_validate(
                base_url=fuzz_url,
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=30,
                excluded_checks=excluded(case),
            )

        try:
            fuzz()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # nothing to get wrong: no input at all
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            failures.append(f"{operation.label} ({mode}): {exc}")
    elapsed = time.monotonic() - started
    assert not failures, "\n\n".join(failures)
    assert elapsed < 120, f"the fuzzing took {elapsed:.0f} s"


def test_the_service_is_healthy_afterwards(fuzz_url: str) -> None:
    ready = requests.get(f"{fuzz_url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    accepted = requests.post(
        f"{fuzz_url}/api/v1/predictions", files={"file": ("x.png", png())}, timeout=10
    )
    assert accepted.status_code == 202, accepted.text
    done = requests.get(f"{fuzz_url}{accepted.json()['status_url']}?wait=20", timeout=30).json()
    assert done["status"] == "done", done
    assert done["result"]["model_version"] in (1, 2)
