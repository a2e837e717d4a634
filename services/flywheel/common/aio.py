"""Glue between an asyncio gRPC server's event loop and the worker threads it hands work to.

``LoopBridge`` turns the ``concurrent.futures.Future`` a worker thread resolves (a model batch)
into an awaitable on the loop. ``asyncio.wrap_future`` would do that with one
``call_soon_threadsafe`` per future: a write to the loop's self-pipe and a wake-up each, 32 of them
for a batch of 32 callers. The bridge queues completions and wakes the loop once per burst, which
is the part no library does for us.

``ThreadContext`` lets blocking code written against the sync ``grpc.ServicerContext`` (the TCP
weight side channel) run in a worker thread on behalf of an asyncio RPC.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc

T = TypeVar("T")


class LoopBridge:
    """Awaitables for futures completed on other threads; the loop is woken once per burst."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._arrived: collections.deque[tuple[Future[Any], asyncio.Future[Any]]] = collections.deque()

    def wrap(self, future: Future[T]) -> asyncio.Future[T]:
        """An asyncio future (of this bridge's loop) that takes ``future``'s result or exception.
        Call it on the loop's thread. Cancelling the returned future does not cancel ``future``."""
        waiter: asyncio.Future[T] = self.loop.create_future()
        future.add_done_callback(lambda done: self._on_done(done, waiter))
        return waiter

    def _on_done(self, future: Future[Any], waiter: asyncio.Future[Any]) -> None:
        # Runs on whichever thread completed the future (the batcher's worker, usually).
        with self._lock:
            self._arrived.append((future, waiter))
            first = len(self._arrived) == 1
        if first:  # later arrivals ride on the wake-up already scheduled
            # RuntimeError: the loop is closed; the server has stopped and nobody awaits.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            arrived = list(self._arrived)
            self._arrived.clear()
        for future, waiter in arrived:
            if waiter.done():  # the awaiting RPC was cancelled or timed out meanwhile
                continue
            if future.cancelled():
                waiter.cancel()
            elif (exc := future.exception()) is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(future.result())


class ThreadContext:
    """The parts of a sync ``grpc.ServicerContext`` that blocking helpers use (deadline, liveness,
    initial metadata), for an asyncio RPC's context, callable from a worker thread."""

    def __init__(self, context: grpc.aio.ServicerContext, loop: asyncio.AbstractEventLoop) -> None:
        self._context = context
        self._loop = loop

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()  # type: ignore[no-any-return]

    def is_active(self) -> bool:
        return not self._context.done()

    def send_initial_metadata(self, metadata: Any) -> None:
        asyncio.run_coroutine_threadsafe(self._context.send_initial_metadata(metadata), self._loop).result()
