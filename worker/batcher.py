"""Dynamic batching: predictions that arrive while the model is busy share one model call.

Each task thread announces its prediction when it starts, hands its decoded image to
:meth:`Batcher.predict` and waits. One model thread takes the first waiting image and gathers
more until ``max_batch``, until ``max_delay`` has passed since the first arrived, or until no
other prediction is announced, and runs them through one compiled call. The model is read from the
holder once per batch, so a hot-swap happens only between batches and every image of a batch is
classified by the same version.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ml.imaging import to_model_input

if TYPE_CHECKING:
    from ml.explain import Heatmap
    from ml.model import Classifier

log = logging.getLogger(__name__)


class NoModelAvailable(RuntimeError):
    """No model version is loaded in this process."""


@dataclass(frozen=True)
class BatchResult:
    """One image's share of a batch."""

    classifier: Classifier
    probabilities: np.ndarray
    batch_size: int
    waited_s: float  # from hand-over to the start of the model call
    model_s: float  # the whole batch's model call (its Grad-CAM pass included)
    heatmap: Heatmap | None = None  # asked for and computed (Grad-CAM, ml.explain)
    explanation_error: str | None = None  # asked for, but none: why
    explain_s: float | None = None  # the batch's Grad-CAM gradient pass
    ood_score: float | None = None  # the version's OOD gate score (ml.ood); None: no gate


@dataclass
class _Pending:
    image: np.ndarray
    arrived: float
    future: Future[BatchResult]
    explain: bool = False


_WAKE = None  # queued by withdraw() to end a wait early


def padded_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a padded batch can have: the powers of two below ``max_batch``, and it."""
    sizes = [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch]
    return (*sizes, max_batch)


def padded_size(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest of ``sizes`` that holds ``n`` images (``n`` itself beyond the largest)."""
    return next((s for s in sizes if s >= n), n)


class Batcher:
    """Groups concurrent single-image predictions of one process into batched model calls.

    With ``pad`` (``CXR_BATCH_PADDING``, off by default) a batch is padded with blank images up
    to the next of :func:`padded_sizes` (TF Serving's ``allowed_batch_sizes``), sizes the holder
    warms up when a version loads (``worker.holder``): every new batch size costs one first call
    that builds its kernels. Measured with ``bench.gap`` on an AMX CPU (VGG16, 224 px) that first
    call is only ~1.3x a steady one, while padding 9 images to 16 costs ~1.8x on every such
    batch: in the stack, padding cut bf16 throughput from 40.8 to 30.0 predictions/s.
    """

    def __init__(
        self,
        current: Callable[[], Classifier | None],
        max_batch: int = 16,
        max_delay_s: float = 0.005,
        on_batch: Callable[[int, float, int | None], None] | None = None,
        pad: bool = False,
    ):
        if max_batch < 1 or max_delay_s < 0:
            raise ValueError("max_batch must be >= 1 and max_delay_s >= 0")
        self.current = current
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        # The sizes a model call sees: the padded ones, or every size up to max_batch.
        self.sizes = padded_sizes(max_batch) if pad else tuple(range(1, max_batch + 1))
        self.pad = pad
        self.on_batch = on_batch
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._announced = 0
        self._thread = threading.Thread(target=self._run, name="cxr-batcher", daemon=True)
        self._thread.start()

    def announce(self) -> None:
        """Say that a prediction is on its way (its task is still reading and decoding).

        A forming batch waits (up to the delay) only while predictions are announced, so a lone
        request at low load runs at once instead of paying the whole delay.
        """
        with self._lock:
            self._announced += 1

    def withdraw(self) -> None:
        """Take back an :meth:`announce` whose prediction will not come (the task failed)."""
        with self._lock:
            self._announced -= 1
            if self._announced <= 0:
                self._queue.put(_WAKE)  # a forming batch stops waiting for it

    def _arrived(self) -> None:
        with self._lock:
            self._announced -= 1

    def predict(
        self,
        image: np.ndarray,
        timeout: float | None = None,
        *,
        announced: bool = False,
        explain: bool = False,
    ) -> BatchResult:
        """Classify one 2-D uint8 grayscale image; blocks until its batch has run.

        ``announced``: this prediction was announced with :meth:`announce` (and now arrives).
        ``explain``: compute its Grad-CAM map too (in the same batch; images may mix).
        """
        pending = _Pending(image, time.perf_counter(), Future(), explain)
        if announced:
            self._arrived()
        self._queue.put(pending)
        return pending.future.result(timeout)

    def _gather(self) -> list[_Pending]:
        first = self._queue.get()
        while first is _WAKE:
            first = self._queue.get()
        batch = [first]
        deadline = first.arrived + self.max_delay_s
        while len(batch) < self.max_batch:
            # Whatever is already waiting joins at once; beyond that, wait out the delay.
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._announced <= 0:
                    break  # the delay is over, or no other prediction is on its way
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is not _WAKE:
                batch.append(item)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._gather()
            try:
                self._run_batch(batch)
            except Exception as exc:  # never let the model thread die
                log.exception("batch of %d failed", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)

    def _run_batch(self, batch: list[_Pending]) -> None:
        classifier = self.current()
        if classifier is None:
            for p in batch:
                p.future.set_exception(NoModelAvailable("no model version is loaded"))
            return
        try:
            x = np.stack([to_model_input(p.image, classifier.input_size) for p in batch])
            wanted = [p.explain for p in batch]
            if self.pad:
                x, wanted = _padded(x, wanted, padded_size(len(batch), self.sizes))
            started = time.perf_counter()
            out = _classify(classifier, x, wanted)
            model_s = time.perf_counter() - started
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            # One image can break a whole call (an odd shape, memory): run each alone so only
            # the culprit fails.
            log.warning("batch of %d failed (%s); retrying one by one", len(batch), exc)
            for p in batch:
                self._run_batch([p])
            return
        if self.on_batch is not None:
            self.on_batch(len(batch), model_s, classifier.version)
        for i, (row, heatmap, p) in enumerate(
            zip(out.probabilities[: len(batch)], out.heatmaps[: len(batch)], batch, strict=True)
        ):
            score = None if out.ood_scores is None else float(out.ood_scores[i])
            p.future.set_result(
                BatchResult(
                    classifier,
                    row,
                    len(batch),
                    started - p.arrived,
                    model_s,
                    heatmap=heatmap,
                    explanation_error=out.error if p.explain else None,
                    explain_s=out.seconds if p.explain else None,
                    ood_score=score,
                )
            )


def _padded(x: np.ndarray, wanted: list[bool], size: int) -> tuple[np.ndarray, list[bool]]:
    """``x`` with blank images appended up to ``size`` rows, and their ``wanted`` flags.

    A blank row asks for a map when every real one does: the Grad-CAM pass then runs on the
    whole padded batch (one shape) instead of a gathered subset of a new size.
    """
    extra = size - len(x)
    if extra <= 0:
        return x, wanted
    blank = np.zeros((extra, *x.shape[1:]), dtype=x.dtype)
    return np.concatenate([x, blank]), wanted + [all(wanted)] * extra


@dataclass(frozen=True)
class _Classified:
    probabilities: np.ndarray
    heatmaps: list[Heatmap | None]
    error: str | None
    seconds: float | None
    ood_scores: np.ndarray | None  # the version's OOD gate scores (ml.ood); None: no gate


def _classify(classifier: Classifier, x: np.ndarray, wanted: list[bool]) -> _Classified:
    """One batch through the model; with Grad-CAM maps for the images that want one.

    Either way it is one forward pass giving the probabilities and, when the version has a
    gate, its scores: ``predict_scored`` or, with maps, ``ml.explain.predict_and_explain``.
    """
    if not any(wanted):
        probs, scores = classifier.predict_scored(x)
        return _Classified(probs, [None] * len(x), None, None, scores)
    # Imported here: ml.explain imports TensorFlow (already loaded with any real classifier),
    # and this module stays importable without it.
    from ml.explain import predict_and_explain

    out = predict_and_explain(classifier, x, wanted)
    return _Classified(out.probabilities, out.heatmaps, out.error, out.seconds, out.ood_scores)
