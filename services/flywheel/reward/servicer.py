"""RewardService RPCs: proto ↔ domain objects, domain exceptions → gRPC status codes.

The handlers are coroutines for the asyncio server (``AioServiceServer``): a Score call awaits its
batch without holding a thread, and anything slow or blocking (staging a weight push, a swap that
waits for the batch in flight) runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from flywheel.common import weight_channel, weights
from flywheel.common.aio import ThreadContext
from flywheel.common.weights import WeightPushError, WeightReceiver
from flywheel.reward.core import (
    InvalidRequest,
    ModelInfo,
    Normalization,
    NotReady,
    Overloaded,
    RequestCancelled,
    RewardService,
    ScoreResult,
    ScoreTimeout,
    UpdateRejected,
)
from flywheel.reward.scorers import Sample, ScorerError
from flywheel.v1 import common_pb2, reward_pb2

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"
NO_DEADLINE_S = 10 * 365 * 24 * 3600.0
SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes did not parse: answered with INVALID_ARGUMENT instead of the INTERNAL
    status gRPC gives when a deserializer raises."""

    message_type: str
    error: str

    def describe(self) -> str:
        return f"request is not a valid {self.message_type} (wrong field types or invalid UTF-8): {self.error}"


def _tolerant(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError) as exc:
            return Malformed(cls.DESCRIPTOR.full_name, str(exc) or type(exc).__name__)

    return parse


def _normalization(n: Normalization) -> reward_pb2.RewardNormalization:
    return reward_pb2.RewardNormalization(enabled=n.enabled, mean=n.mean, std=n.std, clip=n.clip, count=n.count)


def _score_response(result: ScoreResult) -> reward_pb2.ScoreResponse:
    return reward_pb2.ScoreResponse(
        scores=[
            reward_pb2.SampleScore(
                sample_id=s.sample_id, reward=s.reward, raw_reward=s.raw_reward, components=s.components
            )
            for s in result.scores
        ],
        model_version=result.model_version,
        normalization=_normalization(result.normalization),
    )


def _model_response(info: ModelInfo) -> reward_pb2.GetModelResponse:
    response = reward_pb2.GetModelResponse(
        model_version=info.model_version,
        model_id=info.model_id,
        scorers=[
            reward_pb2.ScorerInfo(name=s.name, kind=s.kind, weight=s.weight, source=s.source) for s in info.scorers
        ],
        normalization=_normalization(info.normalization),
        metadata=info.metadata,
    )
    if info.last_push_time is not None:
        response.last_push_time.FromDatetime(info.last_push_time)
    return response


class RewardServicer:
    """Adapts RewardService (core) to the flywheel.v1.RewardService RPCs (asyncio handlers)."""

    def __init__(self, core: RewardService) -> None:
        self.core = core

    async def Score(self, request: Any, context: grpc.aio.ServicerContext) -> reward_pb2.ScoreResponse:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
        samples = [Sample(s.sample_id, s.prompt, s.completion) for s in request.samples]
        remaining = context.time_remaining()
        # Without a deadline gRPC reports a near-infinite remainder that no wait accepts.
        timeout = remaining if remaining is not None and remaining < NO_DEADLINE_S else None
        try:
            result = await self.core.score_async(samples, request.scorer, timeout)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Overloaded as exc:
            context.set_trailing_metadata(((RETRY_AFTER_KEY, str(exc.retry_after_ms)),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ScoreTimeout as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except RequestCancelled as exc:
            await context.abort(grpc.StatusCode.CANCELLED, str(exc))
        except NotReady as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except ScorerError as exc:
            log.error("scoring failed: %s", exc)
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        return _score_response(result)

    async def PushWeights(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> reward_pb2.RewardServicePushWeightsResponse:
        started = time.monotonic()
        try:
            staged, expected = await self._receive(request_iterator, context)
            # The swap waits for the batch in flight (the model lock): not on the event loop.
            update = await asyncio.to_thread(
                self.core.swap_weights,
                staged.tensors,
                staged.version,
                full=staged.kind == "full",
                expected_version=expected,
                metadata=staged.metadata,
            )
        except (WeightPushError, UpdateRejected) as exc:
            await self._fail(context, exc.reason, exc.status, str(exc))
        swapped_at = Timestamp()
        swapped_at.FromDatetime(update.swapped_at)
        result = common_pb2.WeightPushResult(
            version=update.version,
            previous_version=update.previous_version,
            bytes_received=staged.bytes_received,
            tensors_updated=update.tensors_updated,
            seconds=time.monotonic() - started,
            swapped_at=swapped_at,
        )
        return reward_pb2.RewardServicePushWeightsResponse(result=result)

    async def _receive(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> tuple[weights.StagedWeights, int]:
        """Stages the whole stream; returns the verified weights and the version they were staged on.
        Messages are read on the loop; staging them (hashing, the TCP side channel) runs in a worker
        thread, one message at a time, so scoring goes on meanwhile."""
        state, version = await asyncio.to_thread(self.core.weights_snapshot)
        receiver = WeightReceiver(state, version, self.core.config.max_push_bytes, side_channel=True)
        blocking_context = ThreadContext(context, asyncio.get_running_loop())
        async for request in request_iterator:
            if isinstance(request, Malformed):
                raise WeightPushError("malformed", request.describe())
            which = request.WhichOneof("message")
            if which == "manifest" and request.manifest.kind == weights.LORA:
                raise WeightPushError(
                    "unsupported", "the reward service does not load LoRA adapters: push merged weights",
                    "INVALID_ARGUMENT",
                )  # fmt: skip
            message = getattr(request, which) if which else None
            await asyncio.to_thread(
                weight_channel.feed, receiver, which or "", message, blocking_context, self.core.config.host
            )
        return await asyncio.to_thread(receiver.finish), version

    async def _fail(self, context: grpc.aio.ServicerContext, reason: str, status: str, message: str) -> NoReturn:
        self.core.metrics.push_failures.labels(reason).inc()
        log.warning("reward-model push rejected (%s): %s", reason, message)
        code = getattr(grpc.StatusCode, status, grpc.StatusCode.INVALID_ARGUMENT)
        await context.abort(
            code, f"push rejected ({reason}): {message}; version {self.core.model_version} still scoring"
        )
        raise AssertionError("context.abort returns only by raising")  # for type checkers

    async def GetModel(self, request: Any, context: grpc.aio.ServicerContext) -> reward_pb2.GetModelResponse:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
        return _model_response(self.core.describe())


def add_to_server(servicer: RewardServicer, server: grpc.aio.Server) -> None:
    """Registers ``servicer`` like the generated add_RewardServiceServicer_to_server, but with request
    parsers that turn undecodable bytes into INVALID_ARGUMENT rather than INTERNAL."""
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score,
            request_deserializer=_tolerant(reward_pb2.ScoreRequest),
            response_serializer=reward_pb2.ScoreResponse.SerializeToString,
        ),
        "PushWeights": grpc.stream_unary_rpc_method_handler(
            servicer.PushWeights,
            request_deserializer=_tolerant(reward_pb2.RewardServicePushWeightsRequest),
            response_serializer=reward_pb2.RewardServicePushWeightsResponse.SerializeToString,
        ),
        "GetModel": grpc.unary_unary_rpc_method_handler(
            servicer.GetModel,
            request_deserializer=_tolerant(reward_pb2.GetModelRequest),
            response_serializer=reward_pb2.GetModelResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
