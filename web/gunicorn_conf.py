"""gunicorn settings: ``gunicorn --config python:web.gunicorn_conf "web:create_app()"``.

Command-line flags still override these.
"""

import os
import shutil
import tempfile
from typing import Any

# Every gunicorn worker writes metrics here and /metrics serves their sum. prometheus_client reads
# the variable when first imported, so nothing above may import it (web/__init__ does not).
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="cxr-web-metrics-")
    _created_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]


def on_exit(server: Any) -> None:
    """Remove the metrics folder this config created when the gunicorn master stops."""
    path = globals().get("_created_metrics_dir")
    if path:
        shutil.rmtree(path, ignore_errors=True)


bind = os.environ.get("CXR_WEB_BIND_ADDR", "127.0.0.1:8000")
workers = int(os.environ.get("CXR_WEB_WORKERS", "2"))
worker_class = "gthread"
# Threads per worker: long-polling status requests (?wait=) hold one each while they wait.
threads = int(os.environ.get("CXR_WEB_THREADS", "16"))
accesslog = "-"


def child_exit(server: Any, worker: Any) -> None:
    """Drop the live samples of a gunicorn worker that exited."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
