"""Hot-swap under load: promote a new version while predictions stream, with real workers."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import CLASSES, TINY_SIZE, make_settings, start_worker, wait_for
from tests.worker.test_integration import png_bytes
from worker.app import create_celery
from worker.client import Keys, PredictionClient
from worker.registry import ActiveVersion

pytestmark = pytest.mark.integration


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """Version 1 (active) and 2 (a different tiny model) and 3 (a corrupt file)."""
    import keras

    from ml.model import build_classifier
    from ml.versions import save_version

    target = tmp_path / "models"
    shutil.copytree(tiny_model_dir, target)
    keras.utils.set_random_seed(42)
    model = build_classifier(CLASSES, input_size=TINY_SIZE, base_weights=None)
    assert save_version(model, target, class_names=CLASSES, base_weights=None).version == 2
    shutil.copytree(target / "2", target / "3")
    meta = json.loads((target / "3" / "metadata.json").read_text())
    (target / "3" / "metadata.json").write_text(json.dumps(meta | {"version": 3}))
    (target / "3" / "model.keras").write_bytes(b"this is not a keras file")
    return target


class Stream:
    """Submits and polls predictions one after another on a thread until stopped."""

    def __init__(self, client: PredictionClient):
        self.client = client
        self.records: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            started = time.time()
            try:
                job_id = self.client.submit(png_bytes(i), f"{i}.png")
                deadline = time.monotonic() + 30
                while (doc := self.client.status(job_id)) and doc["status"] not in (
                    "done",
                    "failed",
                ):
                    assert time.monotonic() < deadline, "prediction did not finish"
                    time.sleep(0.01)
                assert doc is not None
                self.records.append({"started": started, **doc})
            except Exception as exc:  # every kind of failure counts as a failed request
                self.errors.append(repr(exc))


def test_promote_while_streaming_then_a_corrupt_version(
    redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(redis_url, model_dir)
    r = redis.Redis.from_url(redis_url)
    client = PredictionClient(settings, r, create_celery(settings))
    active = ActiveVersion(r, Keys(settings.key_prefix), model_dir)
    worker = start_worker(settings, tmp_path, concurrency=2)
    try:
        wait_for(lambda: len(worker.heartbeats()) == 2 and worker.serving(1), 90, "serving v1")
        with Stream(client) as stream:
            wait_for(lambda: len(stream.records) >= 10, 30, "predictions on version 1")
            changed_at = time.time()
            active.set(2, actor="test", reason="hot-swap test")
            wait_for(
                lambda: len(worker.heartbeats()) == 2 and worker.serving(2),
                30,
                "both worker processes to serve version 2",
                0.02,
            )
            # The swap is complete once every process reports version 2 (observed here, after
            # the last one finished loading).
            swapped_at = time.time()
            loaded = max(float(str(b["loaded_at"])) for b in worker.heartbeats())
            n = len(stream.records)
            wait_for(lambda: len(stream.records) >= n + 10, 30, "predictions on version 2")

            # A corrupt version is never served: the old one keeps answering, the error shows.
            active.set(3, actor="test", reason="corrupt version")
            wait_for(
                lambda: (
                    len(beats := worker.heartbeats()) == 2
                    and all("version 3" in str(b["error"]) for b in beats)
                ),
                30,
                "both workers to report that version 3 failed",
            )
            n = len(stream.records)
            wait_for(lambda: len(stream.records) >= n + 10, 30, "predictions after the failure")
        assert stream.errors == []
        docs = stream.records
        assert [d["status"] for d in docs] == ["done"] * len(docs), [
            d for d in docs if d["status"] != "done"
        ]
        versions = [d["result"]["model_version"] for d in docs]
        assert set(versions) == {1, 2}
        after = [d["result"]["model_version"] for d in docs if d["started"] > swapped_at]
        around = [(round(d["started"] - swapped_at, 3), d["result"]["model_version"]) for d in docs]
        assert after and set(after) == {2}, around
        assert all(b["model_version"] == 2 and b["state"] == "serving" for b in worker.heartbeats())
        print(  # noqa: T201
            json.dumps(
                {
                    "swap_seconds": round(loaded - changed_at, 3),
                    "requests": len(docs),
                    "failed": len(stream.errors),
                }
            )
        )

        # Back to a good version: the error clears.
        active.set(2, actor="test", reason="back")
        wait_for(lambda: all(b["error"] is None for b in worker.heartbeats()), 30, "error cleared")
    finally:
        worker.stop()
