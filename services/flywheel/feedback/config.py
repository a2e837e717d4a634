"""Feedback configuration."""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.common.config import ConfigError, ServerConfig


@dataclass(frozen=True)
class FeedbackConfig(ServerConfig):
    port: int = 50053
    metrics_port: int = 9103
    durability: str = "everysec"
    """'everysec': acknowledged events survive a crash of this service or of the Redis process, and an
    OS crash loses at most ~1 s; 'always': acknowledgement waits for the AOF fsync (WAITAOF on
    Redis >= 7.2, else appendfsync always)."""
    fsync_timeout_ms: int = 2000
    """durability 'always' on Redis >= 7.2: how long WAITAOF may wait before the call fails UNAVAILABLE."""
    idempotency_ttl_seconds: int = 48 * 3600
    """How long an idempotency key is remembered."""
    rate_limit_per_second: float = 1000.0
    """Token-bucket refill rate of events per API client; 0 disables rate limiting."""
    rate_limit_burst: int = 5000
    """Token-bucket size per API client (at least max_batch_events)."""
    max_batch_events: int = 1000
    """Most events in one SubmitFeedback call."""
    max_text_chars: int = 32_000
    """Longest prompt/completion/correction text accepted."""
    max_metadata_entries: int = 64
    """Most metadata entries on one event."""
    max_metadata_bytes: int = 8192
    """Largest total UTF-8 size of one event's metadata keys and values."""
    consumer_group: str = "learner"
    """Consumer group whose lag GetFeedbackStats and the lag metric report."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.durability not in ("everysec", "always"):
            raise ConfigError(f"durability={self.durability!r}: set 'everysec' or 'always'")
        if self.idempotency_ttl_seconds < 3600:
            raise ConfigError(
                "idempotency_ttl_seconds must be at least 3600 so client retries stay idempotent"
            )
        if self.max_batch_events < 1 or self.max_text_chars < 1:
            raise ConfigError("max_batch_events and max_text_chars must be at least 1")
        if self.rate_limit_per_second < 0:
            raise ConfigError(f"rate_limit_per_second={self.rate_limit_per_second}: set >= 0 (0 = off)")
        if self.rate_limit_per_second > 0 and self.rate_limit_burst < self.max_batch_events:
            raise ConfigError(
                f"rate_limit_burst={self.rate_limit_burst} is below max_batch_events={self.max_batch_events}: "
                "a full batch could never pass; raise rate_limit_burst or lower max_batch_events"
            )
        if self.fsync_timeout_ms < 1:
            raise ConfigError(f"fsync_timeout_ms={self.fsync_timeout_ms} must be at least 1")
