"""The reward service's Prometheus metrics, registered on the server's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from flywheel.common.metrics import LATENCY_BUCKETS


def _size_buckets(max_batch_size: int) -> tuple[float, ...]:
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(float(size))
        size *= 2
    return (*sizes, float(max_batch_size))


class RewardMetrics:
    """Batching, throughput, reward statistics, model version and push outcomes."""

    def __init__(self, registry: CollectorRegistry | None = None, max_batch_size: int = 32) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
        self.batch_size = Histogram(
            "flywheel_reward_batch_size_samples", "Samples per reward-model batch",
            buckets=_size_buckets(max_batch_size), registry=registry,
        )  # fmt: skip
        self.batch_duration = Histogram(
            "flywheel_reward_batch_duration_seconds", "Reward-model forward time per batch",
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "flywheel_reward_queue_depth_samples", "Samples waiting for a model batch", registry=registry
        )
        self.scoring_latency = Histogram(
            "flywheel_reward_scoring_latency_seconds", "Time to score one request, queueing included",
            ["scorer"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.samples = Counter(
            "flywheel_reward_samples_total", "Samples scored (rate() gives samples/s)", ["scorer"],
            registry=registry,
        )  # fmt: skip
        self.dropped = Counter(
            "flywheel_reward_dropped_samples_total",
            "Samples dropped from a batch because their caller cancelled or its deadline passed",
            registry=registry,
        )
        self.rejected = Counter(
            "flywheel_reward_rejected_requests_total", "Score requests refused, by reason", ["reason"],
            registry=registry,
        )  # fmt: skip
        self.reward_mean = Gauge(
            "flywheel_reward_raw_reward_mean", "Running mean of raw (mixed) rewards", ["scorer"],
            registry=registry,
        )  # fmt: skip
        self.reward_std = Gauge(
            "flywheel_reward_raw_reward_std", "Running std of raw (mixed) rewards", ["scorer"],
            registry=registry,
        )  # fmt: skip
        self.model_version = Gauge(
            "flywheel_reward_model_version", "Reward-model version now scoring", registry=registry
        )
        self.pushes = Counter(
            "flywheel_reward_pushes_total", "Reward-model updates swapped in", registry=registry
        )
        self.push_failures = Counter(
            "flywheel_reward_push_failures_total", "Reward-model updates rejected, by reason", ["reason"],
            registry=registry,
        )  # fmt: skip

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_duration.observe(seconds)
