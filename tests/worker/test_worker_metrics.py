"""A worker's Prometheus endpoint after a few known predictions."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, make_settings, start_worker, wait_for
from tests.worker.test_integration import enqueue_raw, job_status, png_bytes

pytestmark = pytest.mark.integration


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels (pid dropped)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid"))
            out[(s.name, labels)] = out.get((s.name, labels), 0.0) + s.value
    return out


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_worker_metrics_after_known_predictions(
    redis_url: str, tiny_model_dir: Path, tmp_path: Path, pool: str
) -> None:
    port = free_port()
    # Each pool also forces a precision: the metric, the heartbeat and every result name it.
    precision = "bfloat16" if pool == "threads" else "float32"
    settings = make_settings(
        redis_url,
        tiny_model_dir,
        worker_metrics_port=port,
        batch_max_size=4,
        batch_max_delay_ms=50,
        precision=precision,
    )
    concurrency = 4 if pool == "threads" else 2
    worker = start_worker(settings, tmp_path, concurrency=concurrency, pool=pool, name=pool)
    try:
        wait_for(lambda: worker.serving(1) and len(worker.heartbeats()) >= 1, 90, "serving")
        ids = [enqueue_raw(settings, png_bytes(i)) for i in range(6)]
        bad = enqueue_raw(settings, b"\x89PNG\r\n\x1a\n broken")
        for job_id in [*ids, bad]:
            wait_for(
                lambda j=job_id: job_status(settings, j)["status"] in ("done", "failed"), 60, "job"
            )
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert {beat["precision"] for beat in worker.heartbeats()} == {precision}
        results = [job_status(settings, j)["result"] for j in ids]
        assert {r["precision"] for r in results} == {precision}
    finally:
        worker.stop()
    values = samples(text)
    assert values[("cxr_predictions_total", (("model_version", "1"), ("status", "done")))] == 6
    assert values[("cxr_predictions_total", (("model_version", "none"), ("status", "failed")))] == 1
    assert values[("cxr_queue_wait_seconds_count", ())] == 7
    batches = values[("cxr_batch_size_count", ())]
    assert 1 <= batches <= 6 and values[("cxr_batch_size_sum", ())] == 6
    assert values[("cxr_model_batch_seconds_count", ())] == batches
    assert values[("cxr_model_loads_total", (("result", "success"),))] >= 1
    assert values[("cxr_model_version_served", ())] >= 1
    assert values[("cxr_worker_precision", (("precision", precision),))] >= 1
