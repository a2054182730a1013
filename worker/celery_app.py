"""Entry point of inference workers: ``celery --app worker.celery_app worker -Q inference``."""

import os
import tempfile

# Pool processes write their metrics to files in this folder and the main process serves the sum
# (worker.metrics); prometheus_client reads the variable when it is first imported, i.e. later.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="cxr-worker-metrics-"))

from worker.app import create_celery  # noqa: E402

app = create_celery(role="inference")
