"""Entry point of inference workers: ``celery --app worker.celery_app worker -Q inference``."""

import atexit
import os
import shutil
import tempfile

# Pool processes write their metrics to files in this folder and the main process serves the sum
# (worker.metrics); prometheus_client reads the variable when it is first imported, i.e. later.
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    _metrics_dir = tempfile.mkdtemp(prefix="cxr-worker-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
    _owner = os.getpid()

    def _remove_metrics_dir() -> None:
        # Only the main process removes it: pool children share the folder.
        if os.getpid() == _owner:
            shutil.rmtree(_metrics_dir, ignore_errors=True)

    atexit.register(_remove_metrics_dir)

from worker.app import create_celery  # noqa: E402

app = create_celery(role="inference")
