"""The learner's Prometheus metrics (on the server's registry) and its per-run JSONL metrics log."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
PHASES = ("generate", "score", "train", "push", "checkpoint", "total")
# Step metric -> gauge suffix (the name after flywheel_learner_).
GAUGES = {
    "reward_mean": "reward_mean",
    "reward_std": "reward_std",
    "kl": "kl",
    "kl_coef": "kl_coef",
    "entropy": "entropy",
    "clipfrac": "clipfrac",
    "approx_kl": "approx_kl",
    "policy_loss": "policy_loss",
    "value_loss": "value_loss",
    "grad_norm": "grad_norm",
    "samples_per_second": "samples_per_second",
    "completion_tokens_mean": "completion_tokens_mean",
    "behaviour_logprob_diff": "behaviour_logprob_diff",
    "behaviour_kl": "behaviour_kl",
    "eval_reward": "eval_reward",
    "eval_kl": "eval_kl",
}
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16)


class LearnerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.gauges = {
            key: Gauge(f"flywheel_learner_{name}", f"Last step's {key}", registry=registry)
            for key, name in GAUGES.items()
        }
        self.policy_version = Gauge("flywheel_learner_policy_version", "Current policy version", registry=registry)
        self.step = Gauge("flywheel_learner_step", "PPO steps completed", registry=registry)
        self.step_seconds = Histogram(
            "flywheel_learner_step_seconds", "Time per step phase", ["phase"], buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.steps = Counter("flywheel_learner_steps_total", "PPO steps completed", registry=registry)
        self.samples = Counter("flywheel_learner_samples_total", "Completions trained on", registry=registry)
        self.push_bytes = Counter("flywheel_learner_push_bytes_total", "Weight bytes pushed", registry=registry)
        self.push_seconds = Histogram(
            "flywheel_learner_push_seconds", "Time to push one version to every replica", buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.push_failures = Counter(
            "flywheel_learner_push_failures_total", "Failed pushes to one replica", registry=registry
        )
        self.rpc_retries = Counter(
            "flywheel_learner_rpc_retries_total", "Generate/Score calls retried", ["service"], registry=registry
        )
        self.step_failures = Counter(
            "flywheel_learner_step_failures_total", "Steps abandoned after an error", registry=registry
        )
        self.waiting = Gauge("flywheel_learner_waiting", "1 while the learner waits for a service",
                             registry=registry)
        self.sample_staleness = Histogram(
            "flywheel_learner_sample_staleness_versions",
            "Async: versions between a sample's policy and the policy it was considered for (trained or dropped)",
            buckets=STALENESS_BUCKETS, registry=registry,
        )
        self.stale_dropped = Counter(
            "flywheel_learner_stale_samples_dropped_total", "Async: samples dropped for exceeding max_policy_lag",
            registry=registry,
        )
        self.rollbacks = Counter(
            "flywheel_learner_rollbacks_total", "Policy rollbacks (manual, or the guard's reason)", ["reason"],
            registry=registry,
        )
        # Learning from feedback (flywheel.learner.feedback_learning).
        self.rm_fits = Counter("flywheel_learner_rm_fits_total", "Reward-model fits by outcome (pushed, skipped)",
                               ["outcome"], registry=registry)
        self.rm_heldout_accuracy = Gauge("flywheel_learner_rm_heldout_accuracy",
                                         "Pairwise accuracy of the last fitted reward model on its held-out slice",
                                         registry=registry)
        self.feedback_events_consumed = Counter(
            "flywheel_learner_feedback_events_consumed_total",
            "Feedback events whose fit was checkpointed and acked", registry=registry,
        )
        self.reward_model_version = Gauge("flywheel_learner_reward_model_version",
                                          "Reward-model version the learner last pushed", registry=registry)

    def observe_step(self, metrics: Mapping[str, float], timings: Mapping[str, float], samples: int) -> None:
        for key, gauge in self.gauges.items():
            if key in metrics:
                gauge.set(metrics[key])
        for phase, seconds in timings.items():
            self.step_seconds.labels(phase).observe(seconds)
        self.steps.inc()
        self.samples.inc(samples)


class MetricsLog:
    """Appends one JSON object per step to run_dir/metrics.jsonl (flushed, so a crash loses at most one)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir).expanduser() / "metrics.jsonl"

    def write(self, record: Mapping[str, object]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")
