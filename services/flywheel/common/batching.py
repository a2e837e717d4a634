"""A generic dynamic batcher: concurrent callers' items are merged into batches for one function.

Callers ``submit`` a list of items and block until every item has a result. One worker thread
takes queued requests in arrival order, waits at most ``max_wait_ms`` after the oldest one for the
batch to fill up to ``max_batch_size`` items, drops requests whose caller has gone away (deadline
passed, client cancelled), runs ``fn`` once on the batch and hands each caller its slice.

Bounded by construction: at most ``max_queue`` items wait; beyond that ``submit`` raises
``QueueFull`` at once (with a retry hint) instead of growing memory. A request that fits in one
batch is never split across batches, so one caller's items see the same state of ``fn``'s world
(e.g. one model version) whenever that is possible.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue cannot take the request now; retry after ``retry_after_ms``."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no more work."""


class RequestDropped(Exception):
    """The request was dropped before it ran because its caller was no longer waiting."""


@dataclass(eq=False)
class _Request(Generic[T, R]):
    items: Sequence[T]
    is_active: Callable[[], bool] | None
    enqueued: float
    future: Future[list[R]] = field(default_factory=Future)
    results: list[R | None] = field(default_factory=list)
    taken: int = 0  # items handed to batches so far
    done: int = 0  # items with results so far

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)

    @property
    def waiting(self) -> int:
        return len(self.items) - self.taken

    def caller_gone(self) -> bool:
        if self.future.done():  # cancelled, or an earlier slice of it failed
            return True
        try:
            return self.is_active is not None and not self.is_active()
        except Exception:  # a broken liveness check must not take the worker down
            log.exception("is_active check failed; treating the request as live")
            return False


@dataclass(frozen=True)
class _Slice(Generic[T, R]):
    request: _Request[T, R]
    start: int
    stop: int


class DynamicBatcher(Generic[T, R]):
    """Merges concurrent ``submit`` calls into batches of at most ``max_batch_size`` items for ``fn``.

    ``fn`` gets a list of items and must return one result per item, in order; if it raises, every
    request in that batch fails with the exception. ``on_batch(size, seconds)`` and
    ``on_queue_depth(depth)`` observe the batcher (metrics); ``on_drop(n_items)`` counts items
    dropped because their caller went away.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], list[R]],
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        *,
        name: str = "batcher",
        on_batch: Callable[[int, float], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("need max_batch_size >= 1, max_queue >= 1 and max_wait_ms >= 0")
        self._fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._on_drop = on_drop
        self._queue: collections.deque[_Request[T, R]] = collections.deque()
        self._depth = 0  # items waiting (not yet taken into a batch)
        self._cond = threading.Condition()
        self._closed = False
        # Smoothed seconds per batch, for the retry hint a rejected caller gets.
        self._batch_seconds = 0.0
        self._worker = threading.Thread(target=self._run, name=f"{name}-worker", daemon=True)
        self._worker.start()

    # --- callers ------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Items waiting to be batched."""
        return self._depth

    def submit_async(
        self, items: Sequence[T], is_active: Callable[[], bool] | None = None
    ) -> Future[list[R]]:
        """Queues ``items``; the future resolves to their results. ``is_active`` (cheap, non-blocking;
        e.g. a gRPC ``context.is_active``) is checked when a batch forms: if it says False the request
        is dropped and the future fails with ``RequestDropped``. ``future.cancel()`` drops it too."""
        if not items:
            raise ValueError("submit needs at least one item")
        if len(items) > self.max_queue:
            raise ValueError(f"{len(items)} items can never fit: the queue holds at most {self.max_queue}")
        request: _Request[T, R] = _Request(list(items), is_active, time.monotonic())
        with self._cond:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            if self._depth + len(items) > self.max_queue:
                raise QueueFull(
                    f"queue full: {self._depth} of {self.max_queue} items waiting, "
                    f"{len(items)} more do not fit",
                    self._retry_after_ms(),
                )
            was_idle = not self._queue
            self._queue.append(request)
            self._depth += len(items)
            depth = self._depth
            # Wake the worker only when it has something to act on: the first request (it sleeps on
            # an empty queue) or a full batch (it ends the window early). Waking it for every
            # arrival in between costs a thread switch each, and under load those add up.
            if was_idle or depth - len(items) < self.max_batch_size <= depth:
                self._cond.notify()
        self._observe_depth(depth)
        return request.future

    def submit(
        self,
        items: Sequence[T],
        timeout: float | None = None,
        is_active: Callable[[], bool] | None = None,
        on_cancel: Callable[[Callable[[], object]], bool] | None = None,
    ) -> list[R]:
        """Queues ``items`` and blocks for their results. After ``timeout`` seconds the request is
        dropped (if it has not run yet) and ``TimeoutError`` is raised. ``on_cancel`` registers a
        callback that cancels the request (e.g. gRPC ``context.add_callback``, which fires when the
        RPC ends), so a cancelled caller stops waiting at once; if it returns False the caller is
        already gone and the request is cancelled now."""
        future = self.submit_async(items, is_active)
        if on_cancel is not None and not on_cancel(future.cancel):
            future.cancel()
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError(f"no result within {timeout:.3f}s") from None
        except CancelledError:
            raise RequestDropped("the request was cancelled before it ran") from None

    def close(self, timeout: float | None = 30.0) -> None:
        """Stops taking work, finishes what is queued, then stops the worker. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    def _retry_after_ms(self) -> int:
        # The time to work off the current queue at the recent pace, at least one batching window.
        batches = math.ceil(max(self._depth, 1) / self.max_batch_size)
        return max(1, math.ceil(1000 * max(batches * self._batch_seconds, self.max_wait)))

    def _observe_depth(self, depth: int) -> None:
        if self._on_queue_depth is not None:
            self._on_queue_depth(depth)

    # --- worker -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            slices, dropped, depth = self._next_batch()
            if dropped and self._on_drop is not None:
                self._on_drop(dropped)
            self._observe_depth(depth)
            if slices is None:
                return
            if slices:
                self._run_batch(slices)

    def _next_batch(self) -> tuple[list[_Slice[T, R]] | None, int, int]:
        """Waits for work and the batching window; returns (slices | None when closed, dropped, depth)."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None, 0, self._depth
            # Wait for the batch to fill, but never longer than max_wait after the oldest request.
            deadline = self._queue[0].enqueued + self.max_wait
            while self._depth < self.max_batch_size and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._take()

    def _take(self) -> tuple[list[_Slice[T, R]], int, int]:
        """Pops up to max_batch_size items, whole requests first; caller holds the lock."""
        slices: list[_Slice[T, R]] = []
        room, dropped = self.max_batch_size, 0
        while self._queue and room > 0:
            request = self._queue[0]
            if request.caller_gone():
                self._queue.popleft()
                dropped += request.waiting
                self._depth -= request.waiting
                if not request.future.cancelled():
                    _set_exception(request.future, RequestDropped("the caller went away before it ran"))
                continue
            # Keep a request whole when it fits in a batch at all: split only oversized ones.
            if slices and request.waiting > room and len(request.items) <= self.max_batch_size:
                break
            n = min(room, request.waiting)
            slices.append(_Slice(request, request.taken, request.taken + n))
            request.taken += n
            self._depth -= n
            room -= n
            if request.waiting == 0:
                self._queue.popleft()
        return slices, dropped, self._depth

    def _run_batch(self, slices: list[_Slice[T, R]]) -> None:
        items = [item for s in slices for item in s.request.items[s.start : s.stop]]
        start = time.perf_counter()
        try:
            results = self._fn(items)
            if len(results) != len(items):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        except Exception as exc:
            for s in slices:
                _set_exception(s.request.future, exc)
            return
        finally:
            seconds = time.perf_counter() - start
            self._batch_seconds = seconds if not self._batch_seconds else 0.8 * self._batch_seconds + 0.2 * seconds
            if self._on_batch is not None:
                self._on_batch(len(items), seconds)
        offset = 0
        for s in slices:
            n = s.stop - s.start
            s.request.results[s.start : s.stop] = results[offset : offset + n]
            offset += n
            s.request.done += n
            if s.request.done == len(s.request.items):
                _set_result(s.request.future, s.request.results)  # type: ignore[arg-type]


def _set_result(future: Future[list[R]], value: list[R]) -> None:
    with contextlib.suppress(InvalidStateError):  # cancelled or failed meanwhile: nobody waits
        future.set_result(value)


def _set_exception(future: Future[list[R]], exc: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):
        future.set_exception(exc)
