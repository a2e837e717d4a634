"""Feedback configuration."""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.common.config import ConfigError, ServerConfig


@dataclass(frozen=True)
class FeedbackConfig(ServerConfig):
    port: int = 50053
    metrics_port: int = 9103
    durability: str = "everysec"
    """'everysec': acknowledged events survive a process crash, and an OS crash losing at most ~1 s;
    'always': acknowledgement waits for fsync."""
    idempotency_ttl_seconds: int = 48 * 3600
    """How long an idempotency key is remembered."""
    rate_limit_per_second: float = 1000.0
    """Token-bucket refill rate of events per API key."""
    rate_limit_burst: int = 5000
    """Token-bucket size per API key."""
    max_batch_events: int = 1000
    """Most events in one SubmitFeedback call."""
    max_text_chars: int = 32_000
    """Longest prompt/completion/correction text accepted."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.durability not in ("everysec", "always"):
            raise ConfigError(f"durability={self.durability!r}: set 'everysec' or 'always'")
        if self.idempotency_ttl_seconds < 3600:
            raise ConfigError(
                "idempotency_ttl_seconds must be at least 3600 so client retries stay idempotent"
            )
