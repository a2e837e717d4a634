"""Does our PPO learn? Steer a tiny LM (first SFT-ed on the project's sentiment corpus) toward positive
sentiment, scored by the VADER lexicon, and watch the mean reward rise.

Ours: the Flywheel learner (``Learner.run_step``: experience -> GAE -> clipped losses -> update) with
in-process sampling (``PolicySampler``), so the bench measures the algorithm, not the network.
Baseline: the pre-RL (SFT) policy's reward on the same held-out evaluation (prompts, samples, seed).
Reward: VADER compound of "prompt completion" in [-1, 1]. The JSON ratio compares the evaluation
rewards shifted to [0, 1] ((r + 1) / 2), so 1.0 means no change; the table also gives the reward
gain per CPU-second of training.

    python -m bench.ppo_learning [--quick]
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from rich.progress import Progress

from bench._common import parse, report
from flywheel.common.tiny_models import cached, sft_on_corpus, tiny_model_path
from flywheel.learner.config import LearnerConfig
from flywheel.learner.core import Learner
from flywheel.learner.local_rollout import PolicySampler, vader_score_fn
from flywheel.learner.metrics import LearnerMetrics
from flywheel.learner.prompts import PromptItem, builtin_sentiment_prompts

SFT_STEPS = 300
SFT_LR = 3e-3
EVAL_PROMPTS = 48
EVAL_SAMPLES = 4


# --- SFT: teach the random tiny model to write the corpus' sentences ----------------------------
def sft_model(steps: int = SFT_STEPS, seed: int = 0) -> Path:
    """The tiny Llama after a short plain-torch SFT on corpus sentences (cached across runs)."""
    base = tiny_model_path("llama")
    digest = hashlib.sha256(f"{base.name}-{steps}-{SFT_LR}-{seed}-v1".encode()).hexdigest()[:10]
    return cached(f"sft-sentiment-{digest}",
                  lambda out: sft_on_corpus(base, out, steps=steps, batch_size=32, learning_rate=SFT_LR, seed=seed))


# --- the PPO run --------------------------------------------------------------------------------
def make_learner(model_path: str, run_dir: Path, **changes: Any) -> Learner:
    fields: dict[str, Any] = dict(
        policy_model=model_path, checkpoint_dir=str(run_dir / "ckpt"), run_dir=str(run_dir),
        prompts_file="builtin://sentiment", prompts_per_step=8, samples_per_prompt=2, minibatch_size=8,
        ppo_epochs=2, max_new_tokens=8, learning_rate=1e-3, init_kl_coef=0.02, vf_coef=0.1,
        checkpoint_every=0, metrics_port=-1,
    )
    fields.update(changes)
    learner = Learner(LearnerConfig(**fields), LearnerMetrics(CollectorRegistry()))
    learner.load()
    learner.rollouts = PolicySampler(learner.model.policy, learner.tokenizer, learner.config, vader_score_fn())
    return learner


def evaluate(learner: Learner, seed: int = 12345) -> float:
    """Mean reward over held-out sampling: EVAL_PROMPTS prompts x EVAL_SAMPLES, fixed seed."""
    cfg = LearnerConfig(**{**learner.config.__dict__, "samples_per_prompt": EVAL_SAMPLES,
                           "prompts_per_step": 1, "minibatch_size": 1, "algorithm": "ppo"})
    sampler = PolicySampler(learner.model.policy, learner.tokenizer, cfg, vader_score_fn())
    prompts = [PromptItem(f"eval-{i}", text=t) for i, t in enumerate(builtin_sentiment_prompts()[::2])]
    batch = sampler.generate(prompts[:EVAL_PROMPTS], seed)
    texts = [p.text for p in batch.prompts for _ in range(EVAL_SAMPLES)]
    scores, _ = sampler.score(texts, batch.completion_texts)
    return sum(scores) / len(scores)


def train(learner: Learner, steps: int, label: str) -> tuple[list[float], float]:
    """Runs ``steps`` PPO steps; returns the per-step rollout rewards and the CPU seconds spent."""
    rewards = []
    cpu_start = time.process_time()
    with Progress() as progress:
        task = progress.add_task(label, total=steps)
        for _ in range(steps):
            metrics = learner.run_step()
            rewards.append(metrics["reward_mean"])
            progress.update(task, advance=1, description=f"{label} reward {metrics['reward_mean']:+.3f}")
    return rewards, time.process_time() - cpu_start


def main() -> None:
    args = parse(__doc__ or "")
    steps = 30 if args.quick else 120
    run_dir = Path(os.environ.get("FLYWHEEL_BENCH_DIR", "bench/results")) / f"ppo_learning-{int(time.time())}"
    model_path = str(sft_model())
    torch.manual_seed(0)
    learner = make_learner(model_path, run_dir)
    before = evaluate(learner)
    rewards, cpu_seconds = train(learner, steps, "ppo")
    after = evaluate(learner)
    k = max(1, steps // 10)
    start, end = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    gain_per_cpu_s = (after - before) / cpu_seconds
    rows = [
        ("model", "tiny Llama, SFT on the sentiment corpus", f"{SFT_STEPS} steps, cached"),
        ("PPO steps", str(steps), "8 prompts x 2 samples, 2 epochs, 8 new tokens"),
        ("rollout reward, first/last 10%", f"{start:+.3f} -> {end:+.3f}", "VADER compound in [-1, 1]"),
        ("eval reward pre-RL (baseline)", f"{before:+.3f}", f"{EVAL_PROMPTS} prompts x {EVAL_SAMPLES}"),
        ("eval reward after PPO (ours)", f"{after:+.3f}", "same prompts, samples, seed"),
        ("CPU seconds (training)", f"{cpu_seconds:.1f}", "time.process_time()"),
        ("eval reward gain per CPU-second", f"{gain_per_cpu_s:+.4f}", ""),
        ("metrics", str(run_dir / "metrics.jsonl"), "flywheel plot RUN_DIR"),
    ]
    report("ppo_learning", rows, ours=(after + 1) / 2, baseline=(before + 1) / 2, target=1.1,
           unit="eval reward (VADER+1)/2, after PPO vs pre-RL")


if __name__ == "__main__":
    main()
