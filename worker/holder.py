"""The per-process model holder: loads a version after the fork and swaps in newer ones."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ml.versions import latest_version, load_classifier

if TYPE_CHECKING:
    from ml.model import Classifier

log = logging.getLogger(__name__)


class ModelHolder:
    """Holds the classifier one worker process serves.

    Loading happens on the process's watcher thread, so a newer version is loaded while the
    current one keeps serving and replaces it in one reference assignment: a task reads
    :meth:`current` once and uses that classifier to the end. A version that fails to load is
    not retried until a different version appears; the old one keeps serving.
    """

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self._classifier: Classifier | None = None
        self._checked = threading.Event()
        self._failed_version: int | None = None
        self.error: str | None = None

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

    def refresh(self) -> None:
        """Load the newest version on disk if it differs from the one served (blocking).

        Called from one thread only (the process's model watcher).
        """
        try:
            wanted = latest_version(self.model_dir)
            serving = self._classifier.version if self._classifier else None
            if wanted is None or wanted == serving or wanted == self._failed_version:
                return
            log.info("loading model version %s from %s", wanted, self.model_dir)
            try:
                classifier = load_classifier(self.model_dir, wanted)
                classifier.warm_up()
            except Exception as exc:
                self._failed_version = wanted
                self.error = f"version {wanted} failed to load: {exc}"
                log.exception("model version %s failed to load; keeping %s", wanted, serving)
                return
            self._classifier = classifier
            self.error = None
            log.info("serving model version %s (was %s)", wanted, serving)
        finally:
            self._checked.set()
