"""A training run's progress: per-epoch and in-epoch reports, the history, cancellation.

:class:`Progress` is what :func:`ml.training.train` hands Keras as a callback: it keeps the
history rows, sends an :class:`EpochReport` after every epoch and a :class:`BatchReport` every
``BATCH_REPORT_SECONDS`` within one, and polls ``should_stop`` after every batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ml.config import TrainConfig

if TYPE_CHECKING:
    import keras

__all__ = ["BatchReport", "EpochReport", "Progress", "TrainingCancelled"]

BATCH_REPORT_SECONDS = 2.0  # in-epoch progress: often enough to watch, rare enough to be free
HISTORY_KEYS = ("loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc")


class TrainingCancelled(Exception):
    """Training stopped because ``should_stop()`` returned True."""


@dataclass
class EpochReport:
    """Progress after one epoch, passed to ``train(on_epoch=...)``.

    ``epoch`` counts from 1 across both phases; ``total_epochs`` is the planned total (it drops
    when early stopping ends a phase before its planned epochs). ``eta_seconds`` is the mean
    epoch time so far times the planned epochs still to run.
    """

    phase: int
    epoch: int
    phase_epoch: int
    phase_epochs: int
    total_epochs: int
    metrics: dict[str, float]
    elapsed_seconds: float
    eta_seconds: float | None


@dataclass
class BatchReport:
    """Progress inside an epoch, passed to ``train(on_batch=...)`` every few seconds.

    ``epoch`` is the running epoch (from 1 across both phases), ``batch`` of ``batches`` the
    training batches it has finished. ``eta_seconds`` is measured on the batches so far: before
    the first epoch ends it is the only estimate there is.
    """

    phase: int
    epoch: int
    batch: int
    batches: int
    total_epochs: int
    elapsed_seconds: float
    eta_seconds: float | None


class Progress:
    """Keeps the history, reports each epoch and polls ``should_stop`` during ``fit``."""

    def __init__(
        self,
        config: TrainConfig,
        started: float,
        batches: int,
        on_epoch: Callable[[EpochReport], None] | None,
        on_batch: Callable[[BatchReport], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.config = config
        self.started = started
        self.batches = batches
        self.on_epoch = on_epoch
        self.on_batch = on_batch
        self.should_stop = should_stop
        self.last_batch_report = -math.inf
        self.history: list[dict[str, Any]] = []
        self.epoch_seconds: list[float] = []
        self.phase = 1
        self.epoch_started = 0.0
        self.phase_first_epoch = 1  # global number of the current phase's first epoch
        self.phase_epoch_index = 0  # the running epoch within its phase, from 0

    def check_stop(self) -> None:
        """Raise TrainingCancelled if the caller asked to stop."""
        if self.should_stop is not None and self.should_stop():
            raise TrainingCancelled("training cancelled on request")

    def callback(self, model: keras.Model) -> keras.callbacks.Callback:
        """A Keras callback bound to ``model`` for one phase's ``fit``."""
        import keras

        def on_epoch_begin(epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.epoch_started = time.monotonic()
            self.phase_epoch_index = epoch

        def on_train_batch_end(batch: int, logs: dict[str, Any] | None = None) -> None:
            if self.should_stop is not None and self.should_stop():
                model.stop_training = True
                # Raised here, not after fit returns: fit would otherwise still run the epoch's
                # validation pass before noticing stop_training.
                raise TrainingCancelled("training cancelled on request")
            self.batch_done(batch + 1)

        def on_epoch_end(epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.record(epoch, logs or {})

        return keras.callbacks.LambdaCallback(
            on_epoch_begin=on_epoch_begin,
            on_epoch_end=on_epoch_end,
            on_train_batch_end=on_train_batch_end,
        )

    def batch_done(self, batch: int) -> None:
        """Send a BatchReport after the first batch and then every BATCH_REPORT_SECONDS."""
        now = time.monotonic()
        if self.on_batch is None or now - self.last_batch_report < BATCH_REPORT_SECONDS:
            return
        self.last_batch_report = now
        epoch = self.phase_first_epoch + self.phase_epoch_index
        remaining = self.remaining_epochs(self.phase_epoch_index + 1)
        per_batch = (now - self.epoch_started) / batch
        self.on_batch(
            BatchReport(
                phase=self.phase,
                epoch=epoch,
                batch=batch,
                batches=self.batches,
                total_epochs=epoch + remaining,
                elapsed_seconds=now - self.started,
                eta_seconds=per_batch * (self.batches - batch)
                + self.mean_epoch_seconds(per_batch) * remaining,
            )
        )

    def remaining_epochs(self, done_in_phase: int) -> int:
        """Planned epochs after the first ``done_in_phase`` of the current phase."""
        later = self.config.planned_epochs(2) if self.phase == 1 else 0
        return self.config.planned_epochs(self.phase) - done_in_phase + later

    def mean_epoch_seconds(self, per_batch: float) -> float:
        """Mean time of the finished epochs, or an estimate from the batch rate before any."""
        if self.epoch_seconds:
            return sum(self.epoch_seconds) / len(self.epoch_seconds)
        return per_batch * self.batches

    def start_phase(self, phase: int) -> None:
        """Mark the start of ``phase``; global epoch numbers continue from the last phase."""
        self.phase = phase
        self.phase_first_epoch = len(self.history) + 1

    def record(self, phase_epoch_index: int, logs: dict[str, Any]) -> None:
        """Append one history row and send the EpochReport."""
        now = time.monotonic()
        self.epoch_seconds.append(now - self.epoch_started)
        metrics = {key: float(logs[key]) for key in HISTORY_KEYS if key in logs}
        epoch = self.phase_first_epoch + phase_epoch_index
        self.history.append({"phase": self.phase, "epoch": epoch, **metrics})
        phase_epochs = self.config.planned_epochs(self.phase)
        remaining = self.remaining_epochs(phase_epoch_index + 1)
        mean = sum(self.epoch_seconds) / len(self.epoch_seconds)
        report = EpochReport(
            phase=self.phase,
            epoch=epoch,
            phase_epoch=phase_epoch_index + 1,
            phase_epochs=phase_epochs,
            total_epochs=epoch + remaining,
            metrics=metrics,
            elapsed_seconds=now - self.started,
            eta_seconds=mean * remaining,
        )
        if self.on_epoch is not None:
            self.on_epoch(report)
