"""The rollback guard: after each pushed version, evaluate it on held-out prompts and decide whether it
violates a bound (eval reward dropped too far below the promoted version's, or KL to the reference
too large). The learner then rolls back (``Learner.rollback_policy``) to the promoted version, or to
the parent of the offending one when nothing is promoted.

The evaluation samples from the *served* version (a Generate call right after the push, fixed seed,
so successive versions are compared on the same prompts and seeds) and measures
KL(served || reference) from the generator's own logprobs of those samples: per-token k3, summed
over each completion, averaged over samples (the ``kl`` metric's convention), always >= 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flywheel.learner.config import LearnerConfig
from flywheel.learner.models import build_batch, reference_logprobs
from flywheel.learner.ppo import kl_estimate
from flywheel.learner.prompts import PromptItem, load_prompt_file

EVAL_SEED = 7_777_777


@dataclass
class Evaluation:
    reward: float
    kl: float
    policy_versions: list[int]


def eval_prompts(config: LearnerConfig) -> list[PromptItem]:
    """The held-out prompts: eval_prompts_file, else the first ones of prompts_file (file order)."""
    source = config.eval_prompts_file or config.prompts_file
    return load_prompt_file(source)[: config.guard_eval_prompts]


@torch.no_grad()
def evaluate_served_policy(rollouts: Any, reference: nn.Module, prompts: list[PromptItem], config: LearnerConfig,
                           pad_id: int) -> Evaluation:
    """Reward and KL(served policy || reference) of one fixed-seed batch on ``prompts``."""
    batch = rollouts.generate(prompts, seed=config.seed * 1_000_003 + EVAL_SEED)
    n = config.samples_per_prompt
    scores, _ = rollouts.score([p.reward_text for p in batch.prompts for _ in range(n)], batch.completion_texts)
    seqs = build_batch(batch.prompt_ids, batch.completion_ids, pad_id)
    ref = reference_logprobs(reference, seqs, config.temperature)  # (B, T)
    served = torch.zeros_like(ref)  # (B, T)
    for b, row in enumerate(batch.behaviour_logprobs):
        k = min(len(row), served.shape[1])
        served[b, :k] = torch.tensor(row[:k])
    known = seqs.mask.clone()
    for b, row in enumerate(batch.behaviour_logprobs):
        known[b, len(row):] = 0  # tokens without a served logprob do not count
    kl = (kl_estimate(served, ref, "k3") * known).sum(1).mean().item()
    return Evaluation(float(sum(scores) / max(len(scores), 1)), kl, list(batch.policy_versions))


def guard_violation(config: LearnerConfig, evaluation: Evaluation, promoted_reward: float | None) -> str | None:
    """The bound ``evaluation`` violates ("kl" or "reward_drop"), or None."""
    if config.guard_max_kl > 0 and evaluation.kl > config.guard_max_kl:
        return "kl"
    if (config.guard_min_reward_drop > 0 and promoted_reward is not None
            and promoted_reward - evaluation.reward > config.guard_min_reward_drop):
        return "reward_drop"
    return None
