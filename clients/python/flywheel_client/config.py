"""Client configuration: addresses, credentials, deadlines, retries, TLS, batching, spool."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import grpc

API_KEY_ENV = "FLYWHEEL_API_KEY"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient failures.

    UNAVAILABLE and DEADLINE_EXCEEDED are retried (feedback events keep their idempotency keys, so a
    retry never stores an event twice); RESOURCE_EXHAUSTED waits for the server's ``retry-after-ms``.
    """

    max_attempts: int = 5
    """Attempts per call, the first included (1 = no retries)."""
    initial_backoff_s: float = 0.1
    """Wait before the first retry."""
    max_backoff_s: float = 5.0
    """Longest wait between attempts."""
    multiplier: float = 2.0
    """Backoff growth per attempt."""
    jitter: float = 0.2
    """Fraction of each wait that is randomised (0..1), so clients do not retry in lockstep."""
    max_retry_after_s: float = 30.0
    """Longest server-requested wait (retry-after) the client honours before giving up."""
    retry_codes: tuple[grpc.StatusCode, ...] = (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    """Status codes that are retried."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("RetryPolicy: need 0 <= initial_backoff_s <= max_backoff_s")
        if not 0 <= self.jitter <= 1 or self.multiplier < 1:
            raise ValueError("RetryPolicy: jitter must be in [0, 1] and multiplier >= 1")


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the channels. Paths to PEM files; all optional (system roots when unset)."""

    root_certificates: str | None = None
    """CA bundle that signed the server certificate."""
    client_certificate: str | None = None
    """Client certificate chain, for mTLS."""
    client_key: str | None = None
    """Client private key, for mTLS."""
    server_name_override: str | None = None
    """Expected server name when it differs from the address host (testing only)."""

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(os.path.expanduser(path), "rb") as fh:
                return fh.read()

        return grpc.ssl_channel_credentials(
            read(self.root_certificates), read(self.client_key), read(self.client_certificate)
        )


@dataclass(frozen=True)
class ClientConfig:
    """Everything a Flywheel client needs. ``api_key`` falls back to $FLYWHEEL_API_KEY."""

    feedback_address: str = "localhost:50053"
    """host:port of the feedback service."""
    generator_address: str = "localhost:50051"
    """host:port of the generator service."""
    api_key: str | None = None
    """API key sent as 'authorization: Bearer <key>'; None reads $FLYWHEEL_API_KEY."""
    timeout_s: float = 10.0
    """Deadline of each attempt of each call."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retries with backoff on transient errors."""
    tls: TlsConfig | None = None
    """None = plaintext (local clusters); a TlsConfig = TLS (production)."""
    max_message_bytes: int = 16 * 1024 * 1024
    """Largest message sent or received."""
    max_batch_events: int = 500
    """Most events per SubmitFeedback call (larger submits are split)."""
    batching: bool = False
    """Queue feedback and send it in the background in batches (flush() or close() sends the rest)."""
    batch_max_delay_s: float = 0.2
    """With batching: longest time an event waits in the queue before its batch is sent."""
    max_queue_events: int = 100_000
    """With batching: queued events before rate()/compare()/... block."""
    spool_path: str | None = None
    """A sqlite file where feedback that cannot be delivered (service down) is kept and resent later."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError("ClientConfig.timeout_s must be > 0")
        if not 1 <= self.max_batch_events <= 100_000 or self.max_queue_events < 1:
            raise ValueError("ClientConfig.max_batch_events must be in 1..100000 and max_queue_events >= 1")

    def resolved_api_key(self) -> str:
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV, "")
        return key

    def metadata(self) -> tuple[tuple[str, str], ...]:
        key = self.resolved_api_key()
        return (("authorization", f"Bearer {key}"),) if key else ()

    def channel_options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.enable_retries", 0),  # retries are ours: they honour retry-after and idempotency
        ]
        if self.tls is not None and self.tls.server_name_override:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name_override))
        return options
