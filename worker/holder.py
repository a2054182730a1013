"""The per-process model holder: loads the active version after the fork and hot-swaps it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ml.precision import Hardware, choose_precision, detect_hardware
from ml.versions import load_classifier
from worker import metrics

if TYPE_CHECKING:
    from ml.model import Classifier

log = logging.getLogger(__name__)


class ModelHolder:
    """Holds the classifier one worker process serves.

    Loading happens on the process's watcher thread, so a new version is loaded while the
    current one keeps serving and replaces it in one reference assignment: a task reads
    :meth:`current` once and uses that classifier to the end. A version that fails to load is
    not retried until the wanted version changes again; the old one keeps serving.
    """

    def __init__(
        self,
        model_dir: Path,
        wanted: Callable[[], int | None],
        precision: str = "auto",
        warm_batch_sizes: Sequence[int] = (1,),
    ):
        self.model_dir = model_dir
        self.wanted = wanted
        # Every batch size the batcher sends is run once at load, before the version serves.
        self.warm_batch_sizes = tuple(warm_batch_sizes)
        self.requested_precision = precision
        # Resolved on the first load, after the fork (GPU detection imports TensorFlow).
        self.precision: str | None = None
        self.hardware: Hardware | None = None
        self._classifier: Classifier | None = None
        self._checked = threading.Event()
        self._failed_version: int | None = None
        self.error: str | None = None
        self.loaded_at: float | None = None

    @property
    def state(self) -> str:
        """``loading`` until the first check ends, then ``serving``, ``no_model`` or ``error``."""
        if self._classifier is not None:
            return "serving"
        if not self._checked.is_set():
            return "loading"
        return "error" if self.error else "no_model"

    def current(self, timeout: float = 0.0) -> Classifier | None:
        """Return the classifier being served, waiting up to ``timeout`` s for the first load."""
        if self._classifier is None and timeout > 0:
            self._checked.wait(timeout)
        return self._classifier

    def refresh(self) -> bool:
        """Load the wanted version if it differs from the one served; return whether it swapped.

        Called from one thread only (the process's model watcher).
        """
        try:
            wanted = self.wanted()
            serving = self._classifier.version if self._classifier else None
            if wanted != self._failed_version:
                self._failed_version = None
                if wanted == serving:
                    self.error = None  # The pointer moved back to what we serve.
            if wanted is None or wanted == serving or wanted == self._failed_version:
                return False
            log.info("loading model version %s from %s", wanted, self.model_dir)
            try:
                if self.precision is None:
                    self.hardware = detect_hardware()
                    self.precision = choose_precision(self.requested_precision, self.hardware)
                    log.info("computing in %s on %s", self.precision, self.hardware)
                    metrics.PRECISION.labels(precision=self.precision).set(1)
                classifier = load_classifier(self.model_dir, wanted, precision=self.precision)
                classifier.warm_up(self.warm_batch_sizes)
            except Exception as exc:
                metrics.MODEL_LOADS.labels(result="failure").inc()
                self._failed_version = wanted
                self.error = f"version {wanted} failed to load: {exc}"
                log.exception("model version %s failed to load; keeping %s", wanted, serving)
                return False
            self._classifier = classifier
            metrics.MODEL_LOADS.labels(result="success").inc()
            metrics.MODEL_VERSION.set(wanted)
            if serving is not None:
                metrics.MODEL_SWAPS.inc()
            self.error = None
            self.loaded_at = time.time()
            log.info("serving model version %s (was %s)", wanted, serving)
            return True
        finally:
            self._checked.set()
