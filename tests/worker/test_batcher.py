"""The dynamic batcher with a stand-in model: grouping, limits, isolation of a bad input."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from worker.batcher import Batcher, NoModelAvailable, padded_size, padded_sizes


class FakeClassifier:
    """Records batch sizes; sleeps per call like a model; fails on an all-255 image."""

    input_size = 8
    version = 7

    def __init__(self, call_seconds: float = 0.02):
        self.call_seconds = call_seconds
        self.sizes: list[int] = []

    def predict_batch(self, x: np.ndarray) -> np.ndarray:
        self.sizes.append(len(x))
        time.sleep(self.call_seconds)
        if any(float(img.min()) == 255.0 for img in x):
            raise ValueError("poisoned image")
        mean = x.reshape(len(x), -1).mean(axis=1) / 255.0
        return np.stack([1 - mean, mean], axis=1)

    def predict_scored(self, x: np.ndarray) -> tuple[np.ndarray, None]:
        return self.predict_batch(x), None


def image(value: int) -> np.ndarray:
    """A constant 2-D uint8 image."""
    return np.full((16, 16), value, np.uint8)


def run_concurrently(batcher: Batcher, values: list[int]) -> list[Any]:
    """Submit every image at once from its own thread; return results or exceptions."""

    def one(v: int) -> Any:
        try:
            return batcher.predict(image(v), timeout=10, announced=True)
        except Exception as exc:
            return exc

    for _ in values:  # as the worker does when each task starts
        batcher.announce()

    with ThreadPoolExecutor(len(values)) as pool:
        return list(pool.map(one, values))


def test_concurrent_requests_share_batches_up_to_the_maximum() -> None:
    model = FakeClassifier()
    batcher = Batcher(lambda: model, max_batch=4, max_delay_s=0.05)
    results = run_concurrently(batcher, list(range(0, 240, 20)))
    assert max(model.sizes) == 4 and sum(model.sizes) == 12
    assert len(model.sizes) <= 4
    for value, result in zip(range(0, 240, 20), results, strict=True):
        # Each request gets its own row back, not a neighbour's.
        assert result.probabilities[1] == pytest.approx(value / 255, abs=1e-6)
        assert result.classifier is model


def test_each_request_gets_its_own_row() -> None:
    model = FakeClassifier()
    batcher = Batcher(lambda: model, max_batch=16, max_delay_s=0.05)
    values = [3, 100, 250, 17, 42, 9]
    results = run_concurrently(batcher, values)
    for value, result in zip(values, results, strict=True):
        assert result.probabilities[1] == pytest.approx(value / 255, abs=1e-6)
        assert result.batch_size >= 1 and result.model_s > 0


def test_max_delay_zero_runs_a_lone_request_at_once() -> None:
    model = FakeClassifier(call_seconds=0)
    batcher = Batcher(lambda: model, max_batch=16, max_delay_s=0.0)
    started = time.perf_counter()
    result = batcher.predict(image(5), timeout=5)
    assert time.perf_counter() - started < 0.05
    assert result.batch_size == 1 and result.waited_s < 0.05


def test_max_delay_waits_for_announced_late_arrivals() -> None:
    model = FakeClassifier(call_seconds=0)
    batcher = Batcher(lambda: model, max_batch=16, max_delay_s=0.3)
    batcher.announce()  # the second request's task has started, still decoding
    first: list[Any] = []
    t = threading.Thread(target=lambda: first.append(batcher.predict(image(1), timeout=5)))
    t.start()
    time.sleep(0.05)
    second = batcher.predict(image(2), timeout=5, announced=True)
    t.join()
    assert model.sizes == [2]
    assert first[0].batch_size == 2 and second.batch_size == 2
    assert 0.03 < first[0].waited_s < 0.3


def test_a_lone_request_does_not_wait_for_the_delay() -> None:
    """With nothing else announced, the batch runs at once however long the delay."""
    model = FakeClassifier(call_seconds=0)
    batcher = Batcher(lambda: model, max_batch=16, max_delay_s=1.0)
    started = time.perf_counter()
    result = batcher.predict(image(3), timeout=5)
    assert time.perf_counter() - started < 0.2
    assert result.batch_size == 1


def test_a_withdrawn_announcement_stops_the_wait() -> None:
    model = FakeClassifier(call_seconds=0)
    batcher = Batcher(lambda: model, max_batch=16, max_delay_s=5.0)
    batcher.announce()
    threading.Timer(0.1, batcher.withdraw).start()  # that task failed before handing over
    started = time.perf_counter()
    batcher.predict(image(4), timeout=10)
    # The wait ends at the next arrival check after the withdrawal, not after 5 s.
    assert time.perf_counter() - started < 5.0


def test_a_bad_input_fails_only_its_own_request() -> None:
    model = FakeClassifier()
    batcher = Batcher(lambda: model, max_batch=8, max_delay_s=0.05)
    values = [10, 20, 255, 30, 40]
    results = run_concurrently(batcher, values)
    failed = [v for v, r in zip(values, results, strict=True) if isinstance(r, Exception)]
    assert failed == [255]
    assert isinstance(results[2], ValueError)
    # The batch ran once together, then each image alone.
    assert model.sizes[0] > 1 and model.sizes.count(1) >= len(values)


def test_no_model_fails_fast() -> None:
    batcher = Batcher(lambda: None, max_batch=4, max_delay_s=0.0)
    with pytest.raises(NoModelAvailable):
        batcher.predict(image(1), timeout=5)


def test_the_model_is_read_once_per_batch() -> None:
    old, new = FakeClassifier(), FakeClassifier()
    served = [old]
    batcher = Batcher(lambda: served[0], max_batch=8, max_delay_s=0.05)
    first = run_concurrently(batcher, [1, 2, 3])
    served[0] = new
    second = run_concurrently(batcher, [4, 5])
    assert {r.classifier for r in first} == {old}
    assert {r.classifier for r in second} == {new}


def test_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        Batcher(lambda: None, max_batch=0)
    with pytest.raises(ValueError):
        Batcher(lambda: None, max_delay_s=-1)


def test_padded_sizes_are_powers_of_two_up_to_the_maximum() -> None:
    assert padded_sizes(16) == (1, 2, 4, 8, 16)
    assert padded_sizes(12) == (1, 2, 4, 8, 12)
    assert padded_sizes(1) == (1,)
    assert [padded_size(n, padded_sizes(12)) for n in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]


@pytest.mark.parametrize(("pad", "seen"), [(True, 4), (False, 3)])
def test_a_batch_is_padded_to_an_allowed_size_and_each_image_keeps_its_row(
    pad: bool, seen: int
) -> None:
    model = FakeClassifier(call_seconds=0.2)
    batcher = Batcher(lambda: model, max_batch=8, max_delay_s=0.5, pad=pad)
    values = [30, 60, 90]
    results = run_concurrently(batcher, values)
    # The model saw the padded batch (blank rows at the end); the results are the real images'.
    assert seen in model.sizes and all(s in batcher.sizes for s in model.sizes)
    for value, result in zip(values, results, strict=True):
        assert result.probabilities[1] == pytest.approx(value / 255, abs=1e-6)
        assert result.batch_size <= 3
