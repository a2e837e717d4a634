"""Generator configuration."""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.common.config import ConfigError, ServerConfig


@dataclass(frozen=True)
class GeneratorConfig(ServerConfig):
    port: int = 50051
    metrics_port: int = 9101
    model: str = "tiny://llama"
    """Hub id, local path, or tiny://llama (a tiny model built locally)."""
    engine: str = "transformers"
    """'vllm' (GPU, production) or 'transformers' (CPU/GPU fallback)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    device: str = "cpu"
    """'cpu' or 'cuda'."""
    max_batch_size: int = 16
    """Most sequences the dynamic batcher runs together."""
    max_wait_ms: float = 5.0
    """How long the batcher waits for more requests before running a partial batch."""
    max_queue: int = 1024
    """Queued sequences before new requests get RESOURCE_EXHAUSTED."""
    max_new_tokens_limit: int = 512
    """Upper bound on a request's max_new_tokens."""
    completion_ttl_seconds: int = 7 * 24 * 3600
    """How long logged completions stay joinable for feedback."""
    gpu_memory_utilization: float = 0.85
    """vLLM: fraction of GPU memory for weights and KV cache."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.engine not in ("vllm", "transformers"):
            raise ConfigError(f"engine={self.engine!r}: set 'vllm' (GPU) or 'transformers'")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype={self.dtype!r}: set float32, bfloat16 or float16")
        if self.max_batch_size < 1 or self.max_queue < 1:
            raise ConfigError("max_batch_size and max_queue must be at least 1")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms={self.max_wait_ms} must be >= 0")
