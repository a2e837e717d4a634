"""Flywheel client SDK: generate with the served policy, send user feedback.

Needs only grpcio and protobuf. Start with :class:`FlywheelClient` (or :class:`AsyncFlywheelClient`)
and a :class:`ClientConfig`; feedback builders for batch submits are in :mod:`flywheel_client.events`.
"""

from flywheel_client import events
from flywheel_client.aio import AsyncFlywheelClient
from flywheel_client.client import FlywheelClient
from flywheel_client.config import ClientConfig, RetryPolicy, TlsConfig
from flywheel_client.results import (
    AckStatus,
    EventAck,
    FeedbackStats,
    FlywheelError,
    GeneratedCompletion,
    GenerateResult,
    StreamChunk,
    SubmitResult,
)

__all__ = [
    "AckStatus",
    "AsyncFlywheelClient",
    "ClientConfig",
    "EventAck",
    "FeedbackStats",
    "FlywheelClient",
    "FlywheelError",
    "GenerateResult",
    "GeneratedCompletion",
    "RetryPolicy",
    "StreamChunk",
    "SubmitResult",
    "TlsConfig",
    "events",
]
