"""Prometheus metrics of the inference workers and the HTTP endpoint that serves them.

Pool processes write their samples into ``PROMETHEUS_MULTIPROC_DIR`` (set by
:mod:`worker.celery_app` before prometheus_client is imported) and the worker's main process
serves their aggregate, so one scrape per worker covers every process in it.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)

log = logging.getLogger(__name__)

QUEUE_WAIT = Histogram(
    "cxr_queue_wait_seconds",
    "Time from upload to a worker starting the prediction.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BATCH_SIZE = Histogram(
    "cxr_batch_size",
    "Images per model call.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
MODEL_SECONDS = Histogram(
    "cxr_model_batch_seconds",
    "Duration of one model call (one batch).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PREDICTIONS = Counter(
    "cxr_predictions_total",
    "Finished predictions by model version and outcome.",
    ["model_version", "status"],
)
OOD_REFUSED = Counter(
    "cxr_ood_refused_total",
    "Predictions refused by the out-of-distribution gate (label null), by model version.",
    ["model_version"],
)
MODEL_LOADS = Counter(
    "cxr_model_loads_total",
    "Model version loads (a success is also a swap when another version was served).",
    ["result"],
)
MODEL_SWAPS = Counter("cxr_model_swaps_total", "Hot-swaps from one served version to another.")
MODEL_VERSION = Gauge(
    "cxr_model_version_served",
    "Model version each worker process serves (0: none).",
    multiprocess_mode="liveall",
)

PRECISION = Gauge(
    "cxr_worker_precision",
    "1 for the precision each worker process computes in (float32, bfloat16, float16).",
    ["precision"],
    multiprocess_mode="liveall",
)


def serve(port: int, addr: str) -> None:
    """Serve the metrics of this worker's processes on ``addr:port`` (port 0: do nothing)."""
    if port == 0:
        return
    registry = None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    if registry is None:
        start_http_server(port, addr)
    else:
        start_http_server(port, addr, registry=registry)
    log.info("metrics on http://%s:%d/metrics", addr, port)


def process_exited(pid: int) -> None:
    """Drop the live gauges of a pool process that ended."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
