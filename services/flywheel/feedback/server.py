"""Feedback server bootstrap: Redis (URL or embedded), the durability check, the servicer."""

from __future__ import annotations

import logging

import grpc

from flywheel.common.config import ConfigError
from flywheel.common.redis_store import open_redis
from flywheel.common.server import ServiceServer, run_service
from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.core import DurabilityError, FeedbackStore
from flywheel.feedback.servicer import FeedbackMetrics, FeedbackServicer
from flywheel.v1 import feedback_pb2, feedback_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name


def build_server(config: FeedbackConfig) -> ServiceServer:
    server = ServiceServer("feedback", config, [SERVICE_NAME])
    state: dict[str, object] = {}

    def load() -> None:
        client, embedded = open_redis(config.redis_url, config.data_dir)
        state["redis"], state["embedded"] = client, embedded
        store = FeedbackStore(
            client,
            durability=config.durability,
            idempotency_ttl_seconds=config.idempotency_ttl_seconds,
            fsync_timeout_ms=config.fsync_timeout_ms,
            group=config.consumer_group,
        )
        try:
            store.prepare()
        except DurabilityError as exc:
            raise ConfigError(str(exc)) from exc
        metrics = FeedbackMetrics(server.registry, store)
        servicer.bind(FeedbackServicer(config, store, metrics))

    def close() -> None:
        if "redis" in state:
            state["redis"].close()  # type: ignore[attr-defined]
        if state.get("embedded") is not None:
            state["embedded"].close()  # type: ignore[attr-defined]

    servicer = _Deferred()
    server.add_servicer(feedback_pb2_grpc.add_FeedbackServiceServicer_to_server, servicer)
    server.on_load(load)
    server.on_shutdown(close)
    return server


class _Deferred(feedback_pb2_grpc.FeedbackServiceServicer):
    """Forwards to the real servicer once loaded; before that, UNAVAILABLE (health says NOT_SERVING)."""

    def __init__(self) -> None:
        self.target: FeedbackServicer | None = None

    def bind(self, target: FeedbackServicer) -> None:
        self.target = target

    def _get(self, context):  # type: ignore[no-untyped-def]
        if self.target is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "feedback service is starting; retry shortly")
        return self.target

    def SubmitFeedback(self, request, context):  # type: ignore[no-untyped-def]
        return self._get(context).SubmitFeedback(request, context)

    def GetFeedbackStats(self, request, context):  # type: ignore[no-untyped-def]
        return self._get(context).GetFeedbackStats(request, context)


def serve(config: FeedbackConfig) -> None:
    run_service(build_server(config))
