"""One RL update on a batch of scored rollouts, CleanRL style: experience -> advantages -> losses ->
epochs of minibatches. Pure torch; where the rollouts came from (gRPC or in-process) is not its business.

PPO follows Huang et al. ("The N Implementation Details of RLHF with PPO"): logprobs recomputed
with the rollout-time policy, per-token KL penalty against the frozen reference, the score at the
last completion token, GAE on the value head, whitened advantages, clipped surrogate and value
losses, gradient clipping, adaptive KL. GRPO / RLOO / REBEL replace the critic with baselines
over the ``samples_per_prompt`` completions of each prompt (adjacent in the batch).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from flywheel.learner.config import LearnerConfig
from flywheel.learner.models import ActorCritic, SequenceBatch, build_batch, reference_logprobs
from flywheel.learner.ppo import (
    AdaptiveKLController,
    behaviour_kl,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    decoupled_policy_loss,
    group_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    rebel_loss,
    token_rewards,
)


@dataclass
class Rollout:
    """Scored completions, ``samples_per_prompt`` adjacent rows per prompt."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    scores: list[float]
    truncated: list[bool]
    behaviour_logprobs: list[list[float]] = field(default_factory=list)
    policy_versions: list[int] = field(default_factory=list)
    sample_weights: list[float] = field(default_factory=list)
    """Async, stale_policy=downweight: per-sample loss weights (empty = all 1)."""

    def __len__(self) -> int:
        return len(self.completion_ids)


@dataclass
class Experience:
    """A rollout turned into tensors, with everything the update holds fixed."""

    batch: SequenceBatch
    old_logprobs: torch.Tensor  # (B, T) under the policy that sampled them
    ref_logprobs: torch.Tensor  # (B, T)
    old_values: torch.Tensor  # (B, T); zeros without a critic
    advantages: torch.Tensor  # (B, T)
    returns: torch.Tensor  # (B, T)
    scores: torch.Tensor  # (B,) sequence reward the algorithm regresses on (REBEL) or reports
    # Async mode (decoupled PPO): the generator's logprobs, and per-sample loss weights.
    behaviour_logprobs: torch.Tensor | None = None  # (B, T); old_logprobs where the generator sent none
    sample_weights: torch.Tensor | None = None  # (B,)


class Trainer:
    """Owns the optimiser, scheduler and KL controller of one learner."""

    def __init__(self, config: LearnerConfig, model: ActorCritic, reference: nn.Module, pad_id: int) -> None:
        self.config = config
        self.model = model
        self.reference = reference
        self.pad_id = pad_id
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, eps=config.adam_eps)
        warmup = config.lr_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.kl_ctl = AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
        self.step = 0

    # --- experience: logprobs, values, rewards, advantages -------------------------------
    @torch.no_grad()
    def make_experience(self, rollout: Rollout) -> tuple[Experience, dict[str, float]]:
        cfg = self.config
        batch = build_batch(rollout.prompt_ids, rollout.completion_ids, self.pad_id)
        self.model.eval()
        outs = [self.model(batch.select(idx), cfg.temperature) for idx in self._chunks(len(rollout))]
        old_logprobs = torch.cat([o.logprobs for o in outs])  # (B, T)
        entropy = torch.cat([o.entropy for o in outs])  # (B, T)
        ref_logprobs = torch.cat(
            [reference_logprobs(self.reference, batch.select(i), cfg.temperature) for i in self._chunks(len(rollout))]
        )  # (B, T)
        mask = batch.mask
        raw_scores = torch.tensor(rollout.scores, dtype=torch.float32)  # (B,)
        truncated = torch.tensor(rollout.truncated, dtype=torch.float32)  # (B,)
        scores = raw_scores + cfg.missing_eos_penalty * truncated
        kl = kl_estimate(old_logprobs, ref_logprobs, "k1") * mask  # (B, T)
        kl_coef = self.kl_ctl.value

        if cfg.algorithm == "ppo":
            old_values = torch.cat([o.values for o in outs])  # (B, T)
            rewards = token_rewards(scores, kl, mask, kl_coef)  # (B, T)
            advantages, returns = compute_gae(rewards, old_values, mask, cfg.gamma, cfg.gae_lambda)
        else:
            old_values = torch.zeros_like(old_logprobs)
            # GRPO puts its KL term in the loss; RLOO and REBEL fold the KL into the sequence reward.
            if cfg.algorithm != "grpo":
                scores = scores - kl_coef * kl.sum(1)
            seq_adv = (
                group_advantages(scores, cfg.samples_per_prompt, cfg.algorithm)
                if cfg.algorithm in ("grpo", "rloo")
                else scores
            )  # (B,)
            advantages = seq_adv[:, None] * mask  # (B, T)
            returns = torch.zeros_like(advantages)
        if cfg.whiten_advantages and cfg.algorithm in ("ppo", "rloo"):
            advantages = masked_whiten(advantages, mask)

        exp = Experience(batch, old_logprobs, ref_logprobs, old_values, advantages, returns, scores)
        metrics = {
            "reward_mean": raw_scores.mean().item(),
            "reward_std": raw_scores.std().item() if len(raw_scores) > 1 else 0.0,
            "kl": kl.sum(1).mean().item(),
            "kl_coef": kl_coef,
            "entropy": masked_mean(entropy, mask).item(),
            "completion_tokens_mean": mask.sum(1).mean().item(),
            "truncated_frac": truncated.mean().item(),
        }
        metrics.update(self._behaviour_drift(rollout, old_logprobs, mask))
        if cfg.mode == "async":
            self._add_behaviour(exp, rollout, metrics)
        return exp, metrics

    def _add_behaviour(self, exp: Experience, rollout: Rollout, metrics: dict[str, float]) -> None:
        """Async: behaviour logprobs (proximal ones where missing) and sample weights for decoupled PPO."""
        mask = exp.batch.mask
        behaviour = exp.old_logprobs.clone()  # (B, T)
        for b, row in enumerate(rollout.behaviour_logprobs):
            n = min(len(row), behaviour.shape[1])
            behaviour[b, :n] = torch.tensor(row[:n])
        exp.behaviour_logprobs = behaviour * mask + exp.old_logprobs * (1 - mask)
        if rollout.sample_weights:
            exp.sample_weights = torch.tensor(rollout.sample_weights, dtype=torch.float32)  # (B,)
        metrics["behaviour_kl"] = behaviour_kl(exp.behaviour_logprobs, exp.old_logprobs, mask).item()

    def _behaviour_drift(self, rollout: Rollout, old_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """Mean |behaviour - recomputed| logprob: ~0 when the generator runs the learner's weights."""
        if not rollout.behaviour_logprobs:
            return {}
        behaviour = torch.zeros_like(old_logprobs)
        known = torch.zeros_like(mask)
        for b, row in enumerate(rollout.behaviour_logprobs):
            n = min(len(row), behaviour.shape[1])
            behaviour[b, :n] = torch.tensor(row[:n])
            known[b, :n] = 1.0
        known = known * mask
        return {"behaviour_logprob_diff": masked_mean((behaviour - old_logprobs).abs(), known).item()}

    def _chunks(self, n: int) -> list[torch.Tensor]:
        return list(torch.arange(n).split(self.config.forward_batch_size))

    # --- losses ------------------------------------------------------------------------------
    def _loss(self, exp: Experience, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        mb = exp.batch.select(idx)
        out = self.model(mb, cfg.temperature, with_entropy=False)
        mask = mb.mask
        if cfg.algorithm == "rebel":
            seq_log_ratio = ((out.logprobs - exp.old_logprobs[idx]) * mask).sum(1)  # (b,)
            loss = rebel_loss(seq_log_ratio, exp.scores[idx], cfg.rebel_eta)
            return loss, {"policy_loss": loss.detach()}
        if exp.behaviour_logprobs is not None:  # async: decoupled PPO against the proximal policy
            weights = exp.sample_weights[idx] if exp.sample_weights is not None else None
            pg = decoupled_policy_loss(out.logprobs, exp.old_logprobs[idx], exp.behaviour_logprobs[idx],
                                       exp.advantages[idx], mask, cfg.clip_coef, cfg.behaviour_ratio_cap, weights)
        else:
            pg = clipped_policy_loss(out.logprobs, exp.old_logprobs[idx], exp.advantages[idx], mask, cfg.clip_coef)
        stats = {"policy_loss": pg.loss.detach(), "clipfrac": pg.clipfrac, "approx_kl": pg.approx_kl}
        loss = pg.loss
        if cfg.algorithm == "grpo":
            kl_loss = masked_mean(kl_estimate(out.logprobs, exp.ref_logprobs[idx], "k3"), mask)
            loss = loss + self.kl_ctl.value * kl_loss
        if out.values is not None:
            vf_loss, vf_clipfrac = clipped_value_loss(
                out.values, exp.old_values[idx], exp.returns[idx], mask, cfg.clip_vf
            )
            loss = loss + cfg.vf_coef * vf_loss
            stats.update(value_loss=vf_loss.detach(), value_clipfrac=vf_clipfrac)
        return loss, stats

    # --- update: epochs of minibatches ----------------------------------------------------
    def _minibatches(self, n: int) -> Iterator[torch.Tensor]:
        """Shuffled minibatch indices; critic-free algorithms keep each prompt's group together."""
        group = 1 if self.config.algorithm == "ppo" else self.config.samples_per_prompt
        order = torch.randperm(n // group)
        rows = (order[:, None] * group + torch.arange(group)[None, :]).reshape(-1)  # (B,)
        yield from rows.split(self.config.minibatch_size)

    def update(self, exp: Experience) -> dict[str, float]:
        self.model.train()
        sums: dict[str, float] = {}
        count = 0
        for _epoch in range(self.config.ppo_epochs):
            for idx in self._minibatches(len(exp.scores)):
                loss, stats = self._loss(exp, idx)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
                self.optimizer.step()
                stats["grad_norm"] = torch.as_tensor(grad_norm).detach()
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                count += 1
        self.scheduler.step()
        return {key: value / count for key, value in sums.items()}

    def train_step(self, rollout: Rollout) -> dict[str, float]:
        """make_experience -> update -> KL controller; returns the step's metrics."""
        if len(rollout) != self.config.batch_size:
            raise ValueError(f"rollout has {len(rollout)} samples, expected {self.config.batch_size}")
        if self.config.algorithm == "dpo":  # online DPO: best vs worst of each prompt's samples
            from flywheel.learner.dpo import dpo_step

            metrics = dpo_step(self, rollout)
            self.step += 1
            metrics["learning_rate"] = float(self.scheduler.get_last_lr()[0])
            return metrics
        exp, metrics = self.make_experience(rollout)
        metrics.update(self.update(exp))
        self.kl_ctl.update(metrics["kl"], len(rollout))
        self.step += 1
        metrics["learning_rate"] = float(self.scheduler.get_last_lr()[0])
        return metrics

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "step": self.step,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        self.scheduler.load_state_dict(state["scheduler"])  # type: ignore[arg-type]
        self.kl_ctl.load_state_dict(state["kl_ctl"])  # type: ignore[arg-type]
        self.step = int(state["step"])  # type: ignore[call-overload]
        set_rng_state(state["rng"])  # type: ignore[arg-type]


def rng_state() -> dict[str, object]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])  # type: ignore[arg-type]
    np.random.set_state(state["numpy"])  # type: ignore[arg-type]
    random.setstate(state["python"])  # type: ignore[arg-type]
