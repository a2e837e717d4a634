"""Learner configuration."""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.common.config import ConfigError, ServerConfig


@dataclass(frozen=True)
class LearnerConfig(ServerConfig):
    port: int = 50054
    metrics_port: int = 9104
    policy_model: str = "tiny://llama"
    """Initial policy: hub id, local path or tiny://llama."""
    reward_target: str = "127.0.0.1:50052"
    """Reward service address."""
    generator_targets: tuple[str, ...] = ("127.0.0.1:50051",)
    """Generator replicas (comma list of host:port), or one dns:///NAME:PORT resolving to all of them."""
    checkpoint_dir: str = "~/.local/share/flywheel/checkpoints"
    """Where atomic checkpoints are written and resumed from."""
    run_dir: str = "~/.local/share/flywheel/runs/default"
    """Metrics JSONL and plots."""
    algorithm: str = "ppo"
    """'ppo', 'grpo', 'rloo' or 'rebel'."""
    autostart: bool = False
    """Start training as soon as the services are reachable (otherwise wait for Resume)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm not in ("ppo", "grpo", "rloo", "rebel"):
            raise ConfigError(f"algorithm={self.algorithm!r}: set ppo, grpo, rloo or rebel")
        if not self.generator_targets:
            raise ConfigError(
                "generator_targets is empty: set FLYWHEEL_LEARNER_GENERATOR_TARGETS=host:port[,host:port]"
            )
