"""DynamicBatcher: merging, bounds, cancellation, failures, shutdown. Synchronised with events
(a batch function that blocks on a gate), never with sleeps or timing thresholds."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from flywheel.common.batching import BatcherClosed, DynamicBatcher, QueueFull, RequestDropped

LONG_WAIT_MS = 60_000.0  # batches then form because they are full, never because time passed


class GatedDouble:
    """Doubles numbers; the first batch blocks until ``gate`` opens, so later requests queue up."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.batches: list[list[int]] = []

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        assert self.gate.wait(30), "test gate never opened"
        return [2 * x for x in items]


@pytest.fixture
def fn() -> Iterator[GatedDouble]:
    f = GatedDouble()
    yield f
    f.gate.set()


def _occupy(batcher: DynamicBatcher[int, int], fn: GatedDouble) -> None:
    """Starts a full batch of zeros that stays running until the gate opens."""
    batcher.submit_async([0] * batcher.max_batch_size)
    assert fn.entered.wait(30)


def test_concurrent_submits_merge_into_one_batch(fn: GatedDouble) -> None:
    sizes: list[int] = []
    batcher = DynamicBatcher(fn, 6, LONG_WAIT_MS, 100, on_batch=lambda n, _s: sizes.append(n))
    _occupy(batcher, fn)
    futures = [batcher.submit_async([i, i + 10]) for i in range(1, 4)]  # 6 items: a full batch
    fn.gate.set()
    assert [f.result(30) for f in futures] == [[2, 22], [4, 24], [6, 26]]
    assert fn.batches[1:] == [[1, 11, 2, 12, 3, 13]]
    assert sizes == [6, 6]
    batcher.close()


def test_requests_are_not_split_when_they_fit_a_batch(fn: GatedDouble) -> None:
    batcher = DynamicBatcher(fn, 4, 0.0, 100)
    _occupy(batcher, fn)
    a = batcher.submit_async([1, 2, 3])
    b = batcher.submit_async([4, 5])  # does not fit beside a: goes to the next batch whole
    c = batcher.submit_async([6, 7, 8, 9, 10, 11])  # bigger than a batch: split
    fn.gate.set()
    assert (a.result(30), b.result(30), c.result(30)) == ([2, 4, 6], [8, 10], [12, 14, 16, 18, 20, 22])
    # b waits for the next batch whole; c is oversized anyway, so it fills the room left
    assert fn.batches[1:] == [[1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    batcher.close()


def test_full_queue_raises_with_retry_hint_and_stays_bounded(fn: GatedDouble) -> None:
    depths: list[int] = []
    batcher = DynamicBatcher(fn, 3, LONG_WAIT_MS, 3, on_queue_depth=depths.append)
    _occupy(batcher, fn)
    waiting = batcher.submit_async([1, 2, 3])
    with pytest.raises(QueueFull) as info:
        batcher.submit_async([4])
    assert info.value.retry_after_ms >= 1
    assert "3 of 3 items waiting" in str(info.value)
    assert batcher.queue_depth == 3
    with pytest.raises(ValueError, match="can never fit"):
        batcher.submit_async([1, 2, 3, 4])
    fn.gate.set()
    assert waiting.result(30) == [2, 4, 6]
    assert max(depths) == 3
    batcher.close()


def test_inactive_and_cancelled_requests_are_dropped_before_running(fn: GatedDouble) -> None:
    dropped: list[int] = []
    batcher = DynamicBatcher(fn, 4, 0.0, 100, on_drop=dropped.append)
    _occupy(batcher, fn)
    gone = batcher.submit_async([1, 2], is_active=lambda: False)
    cancelled = batcher.submit_async([3])
    cancelled.cancel()
    live = batcher.submit_async([5])
    fn.gate.set()
    assert live.result(30) == [10]
    with pytest.raises(RequestDropped):
        gone.result(30)
    assert cancelled.cancelled()
    assert fn.batches[1:] == [[5]]
    assert sum(dropped) == 3
    batcher.close()


def test_on_cancel_hook_stops_the_wait_and_drops_the_request(fn: GatedDouble) -> None:
    batcher = DynamicBatcher(fn, 4, 0.0, 100)
    _occupy(batcher, fn)
    hooks: list[object] = []
    registered = threading.Event()

    def register(callback: object) -> bool:
        hooks.append(callback)
        registered.set()
        return True

    result: dict[str, BaseException] = {}

    def caller() -> None:
        try:
            batcher.submit([7], on_cancel=register)  # type: ignore[arg-type]
        except BaseException as exc:
            result["exc"] = exc

    thread = threading.Thread(target=caller)
    thread.start()
    assert registered.wait(30)  # the caller registers its cancel callback right after queueing
    hooks[0]()  # type: ignore[operator]  # e.g. the RPC was cancelled
    thread.join(30)
    assert isinstance(result["exc"], RequestDropped)
    fn.gate.set()
    assert batcher.submit([1], timeout=30) == [2]
    assert [7] not in fn.batches
    batcher.close()


def test_timeout_drops_the_request(fn: GatedDouble) -> None:
    batcher = DynamicBatcher(fn, 4, 0.0, 100)
    _occupy(batcher, fn)
    with pytest.raises(TimeoutError):
        batcher.submit([9], timeout=0.0)
    fn.gate.set()
    assert batcher.submit([1], timeout=30) == [2]
    assert [9] not in fn.batches
    batcher.close()


def test_batch_failure_reaches_every_caller_in_it() -> None:
    def broken(items: list[int]) -> list[int]:
        raise ValueError(f"cannot score {items}")

    batcher: DynamicBatcher[int, int] = DynamicBatcher(broken, 4, 0.0, 100)
    with pytest.raises(ValueError, match="cannot score"):
        batcher.submit([1], timeout=30)
    batcher.close()

    short: DynamicBatcher[int, int] = DynamicBatcher(lambda items: items[:-1], 4, 0.0, 100)
    with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
        short.submit([1, 2], timeout=30)
    short.close()


def test_close_finishes_queued_work_then_refuses(fn: GatedDouble) -> None:
    batcher = DynamicBatcher(fn, 4, LONG_WAIT_MS, 100)
    _occupy(batcher, fn)
    queued = batcher.submit_async([4])  # would wait a minute for company; close runs it now
    closer = threading.Thread(target=batcher.close)
    closer.start()
    fn.gate.set()
    closer.join(30)
    assert queued.result(30) == [8]
    with pytest.raises(BatcherClosed):
        batcher.submit_async([1])
    batcher.close()  # idempotent


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(lambda x: x, 0, 1.0, 10)
    batcher: DynamicBatcher[int, int] = DynamicBatcher(lambda x: x, 1, 0.0, 10)
    with pytest.raises(ValueError, match="at least one item"):
        batcher.submit_async([])
    batcher.close()
