"""The stack over HTTP: gunicorn in front of the session's Redis and Celery worker."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, WorkerProcess, free_port, settings_env, wait_for
from worker.settings import Settings

DATA_DIR = os.environ.get("CXR_TEST_DATA_DIR")


def real_xrays(per_class: int) -> list[Path]:
    """The first ``per_class`` test-split images of each class in $CXR_TEST_DATA_DIR."""
    assert DATA_DIR is not None
    root = Path(DATA_DIR)
    split = next((root / s for s in ("test", "val", "train") if (root / s).is_dir()), None)
    assert split is not None, f"no test/val/train folder in {root}"
    files: list[Path] = []
    for cls in sorted(p for p in split.iterdir() if p.is_dir()):
        files += sorted(f for f in cls.iterdir() if f.suffix.lower() in {".jpg", ".jpeg", ".png"})[
            :per_class
        ]
    return files


@contextmanager
def gunicorn(settings: Settings, log_dir: Path) -> Iterator[str]:
    """gunicorn serving the app with ``settings`` on 127.0.0.1; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "gunicorn", "--config", "python:web.gunicorn_conf",
           "--bind", f"127.0.0.1:{port}", "--workers", "2", "web:create_app()"]  # fmt: skip
    with (log_dir / f"web-{port}.log").open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=settings_env(settings), stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(f"{url}/healthz", timeout=1).ok
        except requests.ConnectionError:
            return False

    try:
        wait_for(up, 30, "gunicorn")
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="session")
def web_url(
    worker_settings: Settings, live_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """gunicorn in front of the session's worker."""
    with gunicorn(worker_settings, tmp_path_factory.mktemp("gunicorn")) as url:
        yield url
