"""Reward configuration."""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.common.config import ConfigError, ServerConfig


@dataclass(frozen=True)
class RewardConfig(ServerConfig):
    port: int = 50052
    metrics_port: int = 9102
    model: str = "tiny://reward"
    """Sequence-classification reward model: hub id, local path, tiny://reward, or '' for rule rewards only."""
    device: str = "cpu"
    """'cpu' or 'cuda'."""
    max_batch_size: int = 32
    """Most samples scored in one model batch."""
    max_wait_ms: float = 5.0
    """How long the batcher waits for more requests before scoring a partial batch."""
    max_queue: int = 4096
    """Queued samples before new requests get RESOURCE_EXHAUSTED."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_batch_size < 1 or self.max_queue < 1:
            raise ConfigError("max_batch_size and max_queue must be at least 1")
