"""Typed results of client calls."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import grpc


class AckStatus(str, enum.Enum):
    ACCEPTED = "accepted"
    """Durably stored now."""
    DUPLICATE = "duplicate"
    """Stored before under the same idempotency key; event_id is the original one."""
    UNKNOWN_COMPLETION = "unknown_completion"
    """A completion id it names is unknown or expired; not stored."""
    QUEUED = "queued"
    """Batching is on: queued for the background sender (flush() to send now)."""
    SPOOLED = "spooled"
    """The service could not be reached; kept in the on-disk spool and resent later."""


@dataclass(frozen=True)
class EventAck:
    idempotency_key: str
    status: AckStatus
    event_id: str = ""
    message: str = ""

    @property
    def stored(self) -> bool:
        """True when the event is in the feedback stream."""
        return self.status in (AckStatus.ACCEPTED, AckStatus.DUPLICATE)


@dataclass(frozen=True)
class SubmitResult:
    acks: list[EventAck]

    @property
    def all_stored(self) -> bool:
        return all(a.stored for a in self.acks)


@dataclass(frozen=True)
class GeneratedCompletion:
    completion_id: str
    """Give this to rate()/compare()/correct()."""
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    policy_version: int = 0
    logged: bool = False


@dataclass(frozen=True)
class GenerateResult:
    prompt_id: str
    prompt_token_ids: list[int]
    completions: list[GeneratedCompletion]

    @property
    def text(self) -> str:
        """Text of the first completion."""
        return self.completions[0].text if self.completions else ""

    @property
    def completion_id(self) -> str:
        return self.completions[0].completion_id if self.completions else ""


@dataclass(frozen=True)
class StreamChunk:
    completion_id: str
    text_delta: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    policy_version: int


@dataclass(frozen=True)
class FeedbackStats:
    accepted_by_kind: dict[str, int]
    stream_length: int
    consumer_lag: int
    pending: int
    oldest_unconsumed_age_seconds: float
    dead_letter_length: int


class FlywheelError(Exception):
    """A call failed for good (not retryable, or retries exhausted). ``code`` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s
