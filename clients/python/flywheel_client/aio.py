"""The asyncio client (grpc.aio): the same calls as FlywheelClient, as coroutines."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from flywheel.v1 import feedback_pb2, feedback_pb2_grpc, generator_pb2, generator_pb2_grpc
from flywheel_client import events as ev
from flywheel_client.client import GENERATE_RETRY_CODES, PERMANENT_CODES
from flywheel_client.config import ClientConfig
from flywheel_client.results import (
    AckStatus,
    EventAck,
    FeedbackStats,
    FlywheelError,
    GenerateResult,
    StreamChunk,
    SubmitResult,
)
from flywheel_client.retry import next_wait_s
from flywheel_client.spool import Spool

log = logging.getLogger("flywheel_client")


def make_aio_channel(address: str, config: ClientConfig) -> grpc.aio.Channel:
    if config.tls is not None:
        return grpc.aio.secure_channel(address, config.tls.credentials(), options=config.channel_options())
    return grpc.aio.insecure_channel(address, options=config.channel_options())


class AsyncFlywheelClient:
    """Async twin of :class:`flywheel_client.FlywheelClient` (create it inside a running loop).

    >>> async with AsyncFlywheelClient(ClientConfig(api_key="...")) as fw:
    ...     answer = await fw.generate("Hello")
    ...     await fw.rate(answer.completion_id, thumb="up")
    """

    def __init__(self, config: ClientConfig | None = None, **overrides: Any) -> None:
        base = config or ClientConfig()
        self.config = dataclasses.replace(base, **overrides) if overrides else base
        self._feedback_channel = make_aio_channel(self.config.feedback_address, self.config)
        self._generator_channel: grpc.aio.Channel | None = None
        self._feedback = feedback_pb2_grpc.FeedbackServiceStub(self._feedback_channel)
        self.spool = Spool(self.config.spool_path) if self.config.spool_path else None
        self._acks: list[EventAck] = []
        self._errors: list[FlywheelError] = []
        self._queue: asyncio.Queue[feedback_pb2.FeedbackEvent] | None = None
        self._sender: asyncio.Task[None] | None = None
        if self.config.batching:
            self._queue = asyncio.Queue(maxsize=self.config.max_queue_events)
            self._sender = asyncio.get_running_loop().create_task(self._send_loop())

    @property
    def _generator(self) -> generator_pb2_grpc.GeneratorServiceStub:
        if self._generator_channel is None:
            self._generator_channel = make_aio_channel(self.config.generator_address, self.config)
        return generator_pb2_grpc.GeneratorServiceStub(self._generator_channel)

    async def _call(
        self,
        method: Callable[..., Any],
        request: Any,
        codes: tuple[grpc.StatusCode, ...] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(
                    request, timeout=timeout_s or self.config.timeout_s, metadata=self.config.metadata()
                )
            except grpc.RpcError as error:
                await asyncio.sleep(next_wait_s(self.config.retry, error, attempt, codes))

    # --- generation -------------------------------------------------------------------------
    async def generate(
        self, prompts: str | list[str], **kwargs: Any
    ) -> GenerateResult | list[GenerateResult]:
        """See FlywheelClient.generate."""
        timeout_s = kwargs.pop("timeout_s", None)
        request = ev.generate_request(prompts, **kwargs)
        reply = await self._call(self._generator.Generate, request, GENERATE_RETRY_CODES, timeout_s)
        results = ev.to_generate_results(reply)
        return results[0] if isinstance(prompts, str) else results

    async def generate_stream(
        self, prompt: str, timeout_s: float | None = None, **kwargs: Any
    ) -> AsyncIterator[StreamChunk]:
        """See FlywheelClient.generate_stream."""
        full = ev.generate_request(prompt, **kwargs)
        request = generator_pb2.GenerateStreamRequest(
            prompt=full.prompts[0], sampling=full.sampling, purpose=full.purpose,
            user_id=full.user_id, session_id=full.session_id, metadata=full.metadata,
        )  # fmt: skip
        attempt = 0
        while True:
            attempt += 1
            received = False
            try:
                call = self._generator.GenerateStream(
                    request, timeout=timeout_s or self.config.timeout_s, metadata=self.config.metadata()
                )
                async for reply in call:
                    received = True
                    yield ev.to_chunk(reply)
                return
            except grpc.RpcError as error:
                if received:
                    raise FlywheelError(error.code(), error.details() or "") from error  # type: ignore[attr-defined]
                await asyncio.sleep(next_wait_s(self.config.retry, error, attempt, GENERATE_RETRY_CODES))

    # --- feedback ---------------------------------------------------------------------------
    async def rate(
        self, completion_id: str, thumb: ev.Thumb | None = None, score: float | None = None, **kwargs: Any
    ) -> EventAck:
        return await self._one(ev.rating(completion_id, thumb, score, **kwargs))

    async def compare(self, chosen: str, rejected: str, prompt: str | None = None, **kwargs: Any) -> EventAck:
        return await self._one(ev.comparison(chosen, rejected, prompt, **kwargs))

    async def correct(self, completion_id: str, corrected_text: str, **kwargs: Any) -> EventAck:
        return await self._one(ev.correction(completion_id, corrected_text, **kwargs))

    async def log_interaction(self, prompt: str, completion: str, **kwargs: Any) -> EventAck:
        return await self._one(ev.interaction(prompt, completion, **kwargs))

    async def _one(self, event: feedback_pb2.FeedbackEvent) -> EventAck:
        if self._queue is not None:
            await self._queue.put(event)
            return EventAck(event.idempotency_key, AckStatus.QUEUED)
        return (await self.submit([event])).acks[0]

    async def submit(self, batch: Sequence[feedback_pb2.FeedbackEvent]) -> SubmitResult:
        """See FlywheelClient.submit."""
        events = [ev.ensure_key(e) for e in batch]
        acks: list[EventAck] = []
        size = self.config.max_batch_events
        for start in range(0, len(events), size):
            acks += await self._deliver(events[start : start + size])
        return SubmitResult(acks)

    async def _deliver(self, chunk: list[feedback_pb2.FeedbackEvent]) -> list[EventAck]:
        request = feedback_pb2.SubmitFeedbackRequest(events=chunk)
        try:
            return ev.to_acks(await self._call(self._feedback.SubmitFeedback, request))
        except FlywheelError as error:
            if self.spool is None or error.code not in self.config.retry.retry_codes:
                raise
            await asyncio.to_thread(self.spool.put, chunk)
            return [EventAck(e.idempotency_key, AckStatus.SPOOLED, message=str(error)) for e in chunk]

    async def drain_spool(self) -> int:
        """Resends spooled events (see FlywheelClient.drain_spool)."""
        if self.spool is None:
            return 0
        sent = 0
        while events := await asyncio.to_thread(self.spool.peek, self.config.max_batch_events):
            try:
                await self._call(
                    self._feedback.SubmitFeedback, feedback_pb2.SubmitFeedbackRequest(events=events)
                )
            except FlywheelError as error:
                if error.code not in PERMANENT_CODES:
                    return sent
                for event in events:  # find the refused ones, deliver the rest
                    try:
                        await self._call(
                            self._feedback.SubmitFeedback, feedback_pb2.SubmitFeedbackRequest(events=[event])
                        )
                        await asyncio.to_thread(self.spool.remove, [event.idempotency_key])
                    except FlywheelError as one:
                        if one.code not in PERMANENT_CODES:
                            raise
                        await asyncio.to_thread(self.spool.reject, event, str(one))
                sent += len(events)
                continue
            await asyncio.to_thread(self.spool.remove, [e.idempotency_key for e in events])
            sent += len(events)
        return sent

    async def stats(self) -> FeedbackStats:
        reply = await self._call(self._feedback.GetFeedbackStats, feedback_pb2.GetFeedbackStatsRequest())
        return ev.to_stats(reply)

    # --- background batching ----------------------------------------------------------------
    async def _send_loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.config.batch_max_delay_s
            while len(batch) < self.config.max_batch_events:
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            try:
                self._acks += await self._deliver(batch)
            except FlywheelError as error:
                log.error("feedback batch of %d events not delivered: %s", len(batch), error)
                self._errors.append(error)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def flush(self) -> list[EventAck]:
        """Sends everything queued, then resends the spool (see FlywheelClient.flush)."""
        if self._queue is not None:
            await self._queue.join()
        await self.drain_spool()
        acks, errors = self._acks, self._errors
        self._acks, self._errors = [], []
        if errors:
            raise errors[0]
        return acks

    async def close(self) -> None:
        try:
            await self.flush()
        finally:
            if self._sender is not None:
                self._sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._sender
            await self._feedback_channel.close()
            if self._generator_channel is not None:
                await self._generator_channel.close()
            if self.spool is not None:
                self.spool.close()

    async def __aenter__(self) -> AsyncFlywheelClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()
