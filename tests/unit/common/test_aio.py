"""LoopBridge: futures completed on other threads, awaited on an event loop."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

import pytest

from flywheel.common.aio import LoopBridge


def _complete_on_a_thread(futures: list[Future[Any]], values: list[Any]) -> None:
    def run() -> None:
        for future, value in zip(futures, values, strict=True):
            if isinstance(value, BaseException):
                future.set_exception(value)
            elif value == "cancel":
                future.cancel()
            else:
                future.set_result(value)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()


def test_a_burst_of_completions_wakes_the_loop_once_and_each_waiter_gets_its_own() -> None:
    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        original = loop.call_soon_threadsafe

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        bridge = LoopBridge(loop)
        futures: list[Future[int]] = [Future() for _ in range(32)]
        waiters = [bridge.wrap(f) for f in futures]
        # The loop is held by this join: all 32 arrive before it can deliver any.
        _complete_on_a_thread(futures, list(range(32)))  # type: ignore[arg-type]
        results = await asyncio.gather(*waiters)
        return results, wakeups

    results, wakeups = asyncio.run(main())
    assert results == list(range(32))
    assert wakeups == 1


def test_exceptions_and_cancellations_reach_the_waiter() -> None:
    async def main() -> None:
        bridge = LoopBridge(asyncio.get_running_loop())
        failing, cancelled, fine = Future[int](), Future[int](), Future[int]()
        waiters = [bridge.wrap(f) for f in (failing, cancelled, fine)]
        _complete_on_a_thread([failing, cancelled, fine], [ValueError("bad batch"), "cancel", 7])
        with pytest.raises(ValueError, match="bad batch"):
            await waiters[0]
        with pytest.raises(asyncio.CancelledError):
            await waiters[1]
        assert await waiters[2] == 7

    asyncio.run(main())


def test_a_result_for_a_waiter_that_gave_up_is_dropped_quietly() -> None:
    async def main() -> int:
        bridge = LoopBridge(asyncio.get_running_loop())
        late, other = Future[int](), Future[int]()
        gave_up = bridge.wrap(late)
        gave_up.cancel()  # its RPC was cancelled or timed out
        waiter = bridge.wrap(other)
        _complete_on_a_thread([late, other], [1, 2])
        return await waiter

    assert asyncio.run(main()) == 2


def test_an_already_completed_future_is_delivered() -> None:
    async def main() -> str:
        bridge = LoopBridge(asyncio.get_running_loop())
        done: Future[str] = Future()
        done.set_result("ready")
        return await bridge.wrap(done)

    assert asyncio.run(main()) == "ready"
