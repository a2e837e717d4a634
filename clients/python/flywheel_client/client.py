"""The synchronous client: generation and feedback, with retries, batching and a spool."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, overload

import grpc

from flywheel.v1 import feedback_pb2, feedback_pb2_grpc, generator_pb2, generator_pb2_grpc
from flywheel_client import events as ev
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
T = TypeVar("T")

# Generation is not idempotent: a timed-out request may have run, so only connection failures
# and server overload are retried.
GENERATE_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# A batch the service refuses for good: the spool sets it aside instead of retrying forever.
PERMANENT_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS)


def make_channel(address: str, config: ClientConfig) -> grpc.Channel:
    if config.tls is not None:
        return grpc.secure_channel(address, config.tls.credentials(), options=config.channel_options())
    return grpc.insecure_channel(address, options=config.channel_options())


class FlywheelClient:
    """Talks to the generator and the feedback service.

    >>> with FlywheelClient(ClientConfig(api_key="...")) as fw:
    ...     answer = fw.generate("How do I reset my password?")
    ...     fw.rate(answer.completion_id, thumb="up")

    Every call has a deadline (``timeout_s`` per attempt) and retries transient failures with
    backoff; feedback events keep their idempotency keys across retries, so each is stored once.
    With ``batching=True`` feedback calls return QUEUED at once and a background thread sends
    batches; ``flush()`` (or leaving the ``with`` block) sends the rest. With ``spool_path`` set,
    events that cannot be delivered are kept on disk and resent by ``flush()``/``drain_spool()``.
    """

    def __init__(self, config: ClientConfig | None = None, **overrides: Any) -> None:
        import dataclasses

        base = config or ClientConfig()
        self.config = dataclasses.replace(base, **overrides) if overrides else base
        self._feedback_channel: grpc.Channel | None = None
        self._generator_channel: grpc.Channel | None = None
        self.spool = Spool(self.config.spool_path) if self.config.spool_path else None
        self._lock = threading.Lock()
        self._acks: list[EventAck] = []
        self._errors: list[FlywheelError] = []
        self._queue: queue.Queue[feedback_pb2.FeedbackEvent | None] | None = None
        self._sender: threading.Thread | None = None
        self._closed = False
        if self.config.batching:
            self._queue = queue.Queue(maxsize=self.config.max_queue_events)
            self._sender = threading.Thread(target=self._send_loop, name="flywheel-batcher", daemon=True)
            self._sender.start()

    # --- plumbing ---------------------------------------------------------------------------
    @property
    def _feedback(self) -> feedback_pb2_grpc.FeedbackServiceStub:
        if self._feedback_channel is None:
            self._feedback_channel = make_channel(self.config.feedback_address, self.config)
        return feedback_pb2_grpc.FeedbackServiceStub(self._feedback_channel)

    @property
    def _generator(self) -> generator_pb2_grpc.GeneratorServiceStub:
        if self._generator_channel is None:
            self._generator_channel = make_channel(self.config.generator_address, self.config)
        return generator_pb2_grpc.GeneratorServiceStub(self._generator_channel)

    def _call(
        self,
        method: Callable[..., T],
        request: Any,
        codes: tuple[grpc.StatusCode, ...] | None = None,
        timeout_s: float | None = None,
    ) -> T:
        """One unary call with a deadline per attempt and retries with backoff."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(
                    request, timeout=timeout_s or self.config.timeout_s, metadata=self.config.metadata()
                )
            except grpc.RpcError as error:
                wait = next_wait_s(self.config.retry, error, attempt, codes)
                log.debug("retrying in %.2fs after %s", wait, error.code())  # type: ignore[attr-defined]
                time.sleep(wait)

    # --- generation -------------------------------------------------------------------------
    @overload
    def generate(self, prompts: str, **kwargs: Any) -> GenerateResult: ...
    @overload
    def generate(self, prompts: list[str], **kwargs: Any) -> list[GenerateResult]: ...

    def generate(self, prompts: str | list[str], **kwargs: Any) -> GenerateResult | list[GenerateResult]:
        """Samples completions; production completions are logged under their completion_id for
        feedback. Keyword arguments: n, max_new_tokens, temperature, top_p, top_k, stop, seed,
        purpose, user_id, session_id, metadata, timeout_s."""
        timeout_s = kwargs.pop("timeout_s", None)
        request = ev.generate_request(prompts, **kwargs)
        reply = self._call(self._generator.Generate, request, GENERATE_RETRY_CODES, timeout_s)
        results = ev.to_generate_results(reply)
        return results[0] if isinstance(prompts, str) else results

    def generate_stream(
        self, prompt: str, timeout_s: float | None = None, **kwargs: Any
    ) -> Iterator[StreamChunk]:
        """Streams one completion as it is generated; the last chunk has ``finish_reason`` set.
        Retries (on UNAVAILABLE/RESOURCE_EXHAUSTED) only before the first chunk arrives."""
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
                stream = self._generator.GenerateStream(
                    request, timeout=timeout_s or self.config.timeout_s, metadata=self.config.metadata()
                )
                for reply in stream:
                    received = True
                    yield ev.to_chunk(reply)
                return
            except grpc.RpcError as error:
                if received:
                    raise FlywheelError(error.code(), error.details() or "") from error  # type: ignore[attr-defined]
                time.sleep(next_wait_s(self.config.retry, error, attempt, GENERATE_RETRY_CODES))

    # --- feedback ---------------------------------------------------------------------------
    def rate(
        self, completion_id: str, thumb: ev.Thumb | None = None, score: float | None = None, **kwargs: Any
    ) -> EventAck:
        """Thumb ('up'/'down') or ``score`` within ``score_range`` (default 1..5) for a completion."""
        return self._one(ev.rating(completion_id, thumb, score, **kwargs))

    def compare(self, chosen: str, rejected: str, prompt: str | None = None, **kwargs: Any) -> EventAck:
        """``chosen`` preferred over ``rejected``: completion ids, or texts when ``prompt`` is given."""
        return self._one(ev.comparison(chosen, rejected, prompt, **kwargs))

    def correct(self, completion_id: str, corrected_text: str, **kwargs: Any) -> EventAck:
        """The user's better response to a completion."""
        return self._one(ev.correction(completion_id, corrected_text, **kwargs))

    def log_interaction(self, prompt: str, completion: str, **kwargs: Any) -> EventAck:
        """A (prompt, completion) from outside Flywheel, optionally with thumb= or score=."""
        return self._one(ev.interaction(prompt, completion, **kwargs))

    def _one(self, event: feedback_pb2.FeedbackEvent) -> EventAck:
        if self._queue is not None:
            self._check_open()
            self._queue.put(event)
            return EventAck(event.idempotency_key, AckStatus.QUEUED)
        return self.submit([event]).acks[0]

    def submit(self, batch: Sequence[feedback_pb2.FeedbackEvent]) -> SubmitResult:
        """Sends events now (split into calls of max_batch_events), bypassing the batching queue.
        Events without an idempotency key get one. Raises FlywheelError when the service refuses the
        batch (INVALID_ARGUMENT, ALREADY_EXISTS, UNAUTHENTICATED...) or cannot be reached and there
        is no spool; with a spool, undeliverable events come back SPOOLED."""
        self._check_open()
        events = [ev.ensure_key(e) for e in batch]
        acks: list[EventAck] = []
        size = self.config.max_batch_events
        for start in range(0, len(events), size):
            acks += self._deliver(events[start : start + size])
        if self.spool is not None and acks and acks[-1].status is not AckStatus.SPOOLED and len(self.spool):
            self.drain_spool()
        return SubmitResult(acks)

    def _deliver(self, chunk: list[feedback_pb2.FeedbackEvent]) -> list[EventAck]:
        request = feedback_pb2.SubmitFeedbackRequest(events=chunk)
        try:
            return ev.to_acks(self._call(self._feedback.SubmitFeedback, request))
        except FlywheelError as error:
            if self.spool is None or error.code not in self.config.retry.retry_codes:
                raise
            self.spool.put(chunk)
            log.warning("feedback service unavailable (%s): %d events spooled", error, len(chunk))
            return [EventAck(e.idempotency_key, AckStatus.SPOOLED, message=str(error)) for e in chunk]

    def drain_spool(self) -> int:
        """Resends spooled events; returns how many left the spool. Stops at the first batch that
        still cannot be delivered (it stays spooled). Refused events move to ``spool.rejected()``."""
        if self.spool is None:
            return 0
        sent = 0
        while events := self.spool.peek(self.config.max_batch_events):
            request = feedback_pb2.SubmitFeedbackRequest(events=events)
            try:
                self._call(self._feedback.SubmitFeedback, request)
            except FlywheelError as error:
                if error.code not in PERMANENT_CODES:
                    return sent
                sent += self._drain_one_by_one(events)
                continue
            self.spool.remove([e.idempotency_key for e in events])
            sent += len(events)
        return sent

    def _drain_one_by_one(self, events: list[feedback_pb2.FeedbackEvent]) -> int:
        """A refused batch: find the bad events (set aside) and deliver the rest."""
        assert self.spool is not None
        for event in events:
            try:
                self._call(self._feedback.SubmitFeedback, feedback_pb2.SubmitFeedbackRequest(events=[event]))
            except FlywheelError as error:
                if error.code not in PERMANENT_CODES:
                    raise
                self.spool.reject(event, str(error))
                continue
            self.spool.remove([event.idempotency_key])
        return len(events)

    def stats(self) -> FeedbackStats:
        """Counts by kind, stream length and the learner's lag."""
        return ev.to_stats(
            self._call(self._feedback.GetFeedbackStats, feedback_pb2.GetFeedbackStatsRequest())
        )

    # --- background batching ----------------------------------------------------------------
    def _send_loop(self) -> None:
        assert self._queue is not None
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.task_done()
                return
            batch = [first]
            deadline = time.monotonic() + self.config.batch_max_delay_s
            stop = False
            while len(batch) < self.config.max_batch_events:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._send_batch(batch)
            for _ in range(len(batch) + stop):
                self._queue.task_done()
            if stop:
                return

    def _send_batch(self, batch: list[feedback_pb2.FeedbackEvent]) -> None:
        try:
            acks = self._deliver(batch)
        except FlywheelError as error:
            log.error("feedback batch of %d events not delivered: %s", len(batch), error)
            with self._lock:
                self._errors.append(error)
            return
        with self._lock:
            self._acks += acks

    def flush(self) -> list[EventAck]:
        """Sends everything queued, then resends the spool. Returns the acknowledgements of batched
        events since the last flush; raises the first FlywheelError a background batch hit."""
        if self._queue is not None:
            self._queue.join()
        self.drain_spool()
        with self._lock:
            acks, errors = self._acks, self._errors
            self._acks, self._errors = [], []
        if errors:
            raise errors[0]
        return acks

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("FlywheelClient is closed")

    def close(self) -> None:
        """Flushes (batching, spool), stops the sender, closes channels. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._queue is not None and self._sender is not None:
                self._queue.put(None)
                self._sender.join()
            for channel in (self._feedback_channel, self._generator_channel):
                if channel is not None:
                    channel.close()
            if self.spool is not None:
                self.spool.close()

    def __enter__(self) -> FlywheelClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
