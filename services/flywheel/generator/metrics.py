"""Generator metrics, on the server's registry (names: flywheel_generator_<what>_<unit>)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from flywheel.common.metrics import LATENCY_BUCKETS

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BYTE_BUCKETS = tuple(float(1 << p) for p in range(10, 40, 3))


class GeneratorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        p = "flywheel_generator_"
        self.tokens = Counter(p + "generated_tokens_total", "Completion tokens generated", registry=registry)
        self.batch_size = Histogram(
            p + "batch_size_sequences", "Sequences per engine batch", buckets=BATCH_BUCKETS, registry=registry
        )
        self.queue_depth = Gauge(p + "queue_depth_sequences", "Sequences waiting for a batch", registry=registry)
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Queueing + prefill until the first token",
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.latency = Histogram(
            p + "request_latency_seconds", "Generate/GenerateStream latency", ["rpc"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.completions = Counter(
            p + "completions_total", "Completions returned", ["finish_reason"], registry=registry
        )
        self.policy_version = Gauge(p + "policy_version", "Policy version being served", registry=registry)
        self.push_bytes = Counter(p + "push_bytes_total", "Bytes received by weight pushes", registry=registry)
        self.push_seconds = Histogram(
            p + "push_seconds", "Weight push time, manifest to swap", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.push_failures = Counter(
            p + "push_failures_total", "Rejected weight pushes", ["reason"], registry=registry
        )
        self.log_failures = Counter(
            p + "completion_log_failures_total", "Completion-log writes that failed", registry=registry
        )

    def engine_listener(self, what: str, value: float) -> None:
        """Receives the engine's stats events."""
        if what == "tokens":
            self.tokens.inc(value)
        elif what == "batch_size":
            self.batch_size.observe(value)
        elif what == "queue":
            self.queue_depth.set(value)
        elif what == "ttft":
            self.ttft.observe(value)
