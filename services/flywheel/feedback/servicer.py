"""FeedbackService over gRPC: protos ↔ domain objects, errors ↔ status codes, metrics."""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally  # prometheus_client has the Counter name here
from collections.abc import Iterable

import grpc
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from flywheel.common import keys
from flywheel.common.auth import current_client
from flywheel.common.metrics import LATENCY_BUCKETS
from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.core import (
    FeedbackStore,
    IdempotencyConflict,
    JoinItem,
    JoinRejected,
    NotDurable,
    Outcome,
    RateLimit,
    RateLimited,
    StoreItem,
)
from flywheel.feedback.join import build_record, missing_completions, record_parts, rejected_join
from flywheel.feedback.records import KINDS
from flywheel.feedback.validation import EventDraft, InvalidBatch, Limits, parse_batch
from flywheel.v1 import feedback_pb2, feedback_pb2_grpc

log = logging.getLogger(__name__)

STATUS = {
    "accepted": feedback_pb2.EVENT_STATUS_ACCEPTED,
    "duplicate": feedback_pb2.EVENT_STATUS_DUPLICATE,
    "unknown": feedback_pb2.EVENT_STATUS_UNKNOWN_COMPLETION,
}
RETRY_AFTER_HEADER = "retry-after-ms"
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class FeedbackMetrics:
    """flywheel_feedback_* metrics on the server's registry."""

    def __init__(self, registry: CollectorRegistry, store: FeedbackStore) -> None:
        self.accepted = Counter(
            "flywheel_feedback_events_accepted_total", "Events durably stored", ["kind"], registry=registry
        )
        self.duplicates = Counter(
            "flywheel_feedback_events_duplicate_total",
            "Retried events answered with their original acknowledgement",
            ["kind"],
            registry=registry,
        )
        self.rejected = Counter(
            "flywheel_feedback_events_rejected_total",
            "Events not stored, by reason (invalid, unknown_completion, idempotency_conflict, "
            "rate_limited, unavailable)",
            ["kind", "reason"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "flywheel_feedback_batch_size_events",
            "Events per SubmitFeedback call",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.ack_latency = Histogram(
            "flywheel_feedback_ack_latency_seconds",
            "From receiving a batch to acknowledging it (stored, and fsynced under durability 'always')",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.lag = Gauge(
            "flywheel_feedback_stream_lag_events",
            "Feedback events not yet delivered to the learner's consumer group (read at scrape time)",
            registry=registry,
        )
        self.lag.set_function(lambda: self._lag(store))

    @staticmethod
    def _lag(store: FeedbackStore) -> float:
        try:
            return float(store.stats().consumer_lag)
        except redis.RedisError:
            return float("nan")

    def reject(self, kinds: Iterable[str], reason: str) -> None:
        for kind in kinds:
            self.rejected.labels(kind, reason).inc()


def _request_kinds(request: feedback_pb2.SubmitFeedbackRequest) -> list[str]:
    return [e.WhichOneof("kind") or "unset" for e in request.events]


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(
        self,
        config: FeedbackConfig,
        store: FeedbackStore,
        metrics: FeedbackMetrics,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.limits = Limits(
            config.max_batch_events,
            config.max_text_chars,
            config.max_metadata_entries,
            config.max_metadata_bytes,
        )

    # --- who is calling -----------------------------------------------------------------------
    @staticmethod
    def client_name(context: grpc.ServicerContext) -> str:
        """The API client's name, as the auth interceptor established it (rate limits and
        idempotency keys are scoped by it); 'anonymous' only with auth_disabled."""
        return current_client()

    # --- RPCs -------------------------------------------------------------------------------
    def SubmitFeedback(
        self, request: feedback_pb2.SubmitFeedbackRequest, context: grpc.ServicerContext
    ) -> feedback_pb2.SubmitFeedbackResponse:
        start = time.perf_counter()
        self.metrics.batch_size.observe(len(request.events))
        client = self.client_name(context)
        try:
            drafts = parse_batch(request, self.limits)
        except InvalidBatch as exc:
            self.metrics.reject(_request_kinds(request), "invalid")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            return self._submit(drafts, client, context, start)
        except redis.RedisError as exc:
            log.warning("feedback storage error: %s", exc)
            self.metrics.reject((d.kind for d in drafts), "unavailable")
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"feedback storage (Redis) is unavailable: {exc}; retry with the same idempotency keys",
            )
            raise AssertionError("context.abort raises") from exc

    def _submit(
        self, drafts: list[EventDraft], client: str, context: grpc.ServicerContext, start: float
    ) -> feedback_pb2.SubmitFeedbackResponse:
        try:
            outcomes = self._join_and_store(drafts, client)
        except RateLimited as exc:
            self.metrics.reject((d.kind for d in drafts), "rate_limited")
            context.set_trailing_metadata(((RETRY_AFTER_HEADER, str(exc.wait_ms)),))
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit for client {client!r} ({self.config.rate_limit_per_second:g} events/s, "
                f"burst {self.config.rate_limit_burst}): retry after {exc.wait_ms} ms",
            )
        except JoinRejected as exc:
            self.metrics.reject((d.kind for d in drafts), "invalid")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(rejected_join(drafts[exc.index], exc.reason)))
        except IdempotencyConflict as exc:
            self.metrics.reject((d.kind for d in drafts), "idempotency_conflict")
            draft = drafts[exc.index]
            context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"events[{draft.index}].idempotency_key: {draft.idempotency_key!r} was already used for a "
                f"different event (stored as {exc.existing_event_id or 'an earlier event in this batch'}); "
                "use a new key for a new event. Nothing in this batch was stored.",
            )
        except NotDurable as exc:
            self.metrics.reject((d.kind for d in drafts), "unavailable")
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; retry with the same idempotency keys")
        except InvalidBatch as exc:  # the Python join's verdict
            self.metrics.reject((d.kind for d in drafts), "invalid")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        response = self._response(drafts, outcomes)
        self.metrics.ack_latency.observe(time.perf_counter() - start)
        return response

    def _join_and_store(self, drafts: list[EventDraft], client: str) -> list[Outcome]:
        """Rate limit and join in Redis (one script); the Python join when the script leaves a
        batch to it (the script took the batch's tokens already)."""
        now = time.time()
        items = []
        for draft in drafts:
            head, tail = record_parts(draft, client, now)
            items.append(
                JoinItem(
                    keys.idempotency_key(f"{client}:{draft.idempotency_key}"),
                    draft.payload_hash(),
                    draft.kind,
                    head,
                    tail,
                    tuple(draft.completion_ids),
                    draft.texts.get("corrected_text", "") if draft.kind == "correction" else "",
                )
            )
        limit = None
        if self.config.rate_limit_per_second > 0:
            limit = RateLimit(client, self.config.rate_limit_per_second, self.config.rate_limit_burst)
        outcomes = self.store.join_and_store(items, limit)
        return outcomes if outcomes is not None else self._python_join_and_store(drafts, client)

    def _python_join_and_store(self, drafts: list[EventDraft], client: str) -> list[Outcome]:
        logged = self.store.lookup_completions({cid for d in drafts for cid in d.completion_ids})
        items: list[StoreItem] = []
        missing: dict[int, tuple[str, ...]] = {}
        for draft in drafts:
            key = keys.idempotency_key(f"{client}:{draft.idempotency_key}")
            unknown = missing_completions(draft, logged)
            record = "" if unknown else build_record(draft, client, logged).to_json()
            if unknown:
                missing[draft.index] = tuple(unknown)
            items.append(StoreItem(key, draft.payload_hash(), draft.kind, record))
        outcomes = self.store.store(items)
        return [
            Outcome(o.status, o.event_id, missing.get(i, ())) if o.status == "unknown" else o
            for i, o in enumerate(outcomes)
        ]

    def _response(
        self, drafts: list[EventDraft], outcomes: list[Outcome]
    ) -> feedback_pb2.SubmitFeedbackResponse:
        response = feedback_pb2.SubmitFeedbackResponse()
        results = response.results
        counts: Tally[tuple[str, str]] = Tally()
        for draft, outcome in zip(drafts, outcomes, strict=True):
            counts[outcome.status, draft.kind] += 1
            message = ""
            if outcome.status == "duplicate":
                message = "already stored under this idempotency key; this is the original acknowledgement"
            elif outcome.status == "unknown":
                ids = ", ".join(repr(c) for c in outcome.missing)
                message = f"completion {ids} is unknown or expired from the completion log; not stored"
            results.add(
                idempotency_key=draft.idempotency_key,
                status=STATUS[outcome.status],
                event_id=outcome.event_id,
                message=message,
            )
        # One metric update per (status, kind) rather than per event: labels() takes a lock.
        for (status, kind), count in counts.items():
            if status == "accepted":
                self.metrics.accepted.labels(kind).inc(count)
            elif status == "duplicate":
                self.metrics.duplicates.labels(kind).inc(count)
            else:
                self.metrics.rejected.labels(kind, "unknown_completion").inc(count)
        return response

    def GetFeedbackStats(
        self, request: feedback_pb2.GetFeedbackStatsRequest, context: grpc.ServicerContext
    ) -> feedback_pb2.GetFeedbackStatsResponse:
        stats = self.store.stats()
        counts = {kind: stats.accepted_by_kind.get(kind, 0) for kind in KINDS}
        return feedback_pb2.GetFeedbackStatsResponse(
            accepted_by_kind=counts,
            stream_length=stats.stream_length,
            consumer_lag=stats.consumer_lag,
            pending=stats.pending,
            oldest_unconsumed_age_seconds=stats.oldest_unconsumed_age_seconds,
            dead_letter_length=stats.dead_letter_length,
        )
