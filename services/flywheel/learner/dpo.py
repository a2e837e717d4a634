"""Online DPO (Rafailov et al. 2023; online as in Guo et al. 2024, "Direct Language Model Alignment
from Online AI Feedback"): the generator samples ``samples_per_prompt`` completions per prompt, the
reward service ranks them, the best and the worst of each prompt form a pair
(``training.data.best_and_worst_of_n``), and the policy takes the DPO loss against the frozen reference:

    loss = -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))))

Pure torch, like the PPO losses; the offline variant on exported pairs is TRL's DPOTrainer
(`flywheel train dpo`). Shapes: P pairs, T completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from flywheel.learner.models import build_batch, reference_logprobs
from flywheel.learner.ppo import masked_mean
from flywheel.training.data import best_and_worst_of_n

if TYPE_CHECKING:
    from flywheel.learner.trainer import Rollout, Trainer


@dataclass
class DPOLossOut:
    loss: torch.Tensor  # scalar
    chosen_rewards: torch.Tensor  # (P,) beta * log-ratio of the chosen completion, detached
    rejected_rewards: torch.Tensor  # (P,)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> DPOLossOut:
    """The sigmoid DPO loss, averaged over pairs. Inputs are sequence log-probs (sums over tokens), (P,)."""
    chosen_log_ratio = chosen_logps - ref_chosen_logps  # (P,)
    rejected_log_ratio = rejected_logps - ref_rejected_logps  # (P,)
    logits = beta * (chosen_log_ratio - rejected_log_ratio)  # (P,)
    loss = -F.logsigmoid(logits).mean()
    return DPOLossOut(loss, beta * chosen_log_ratio.detach(), beta * rejected_log_ratio.detach())


def preference_rows(rollout: Rollout, samples_per_prompt: int, min_margin: float = 0.0) -> list[tuple[int, int]]:
    """(chosen row, rejected row) per prompt group: best vs worst score, duplicates and ties dropped."""
    samples: list[dict[str, Any]] = []
    for row, (ids, score) in enumerate(zip(rollout.completion_ids, rollout.scores, strict=True)):
        # Token ids as text: best_and_worst_of_n dedupes and ranks on strings; the row rides along.
        samples.append({"prompt": str(row // samples_per_prompt), "completion": " ".join(map(str, ids)),
                        "score": score, "row": row})
    by_text: dict[tuple[str, str], int] = {(s["prompt"], s["completion"]): s["row"] for s in reversed(samples)}  # first row of a text
    pairs = best_and_worst_of_n(samples, min_margin)
    return [(by_text[(p["prompt"], p["chosen"])], by_text[(p["prompt"], p["rejected"])]) for p in pairs]


def dpo_step(trainer: Trainer, rollout: Rollout) -> dict[str, float]:
    """One online-DPO update of ``trainer.model.policy`` on ``rollout`` (scored samples); metrics."""
    cfg, model = trainer.config, trainer.model
    rows = preference_rows(rollout, cfg.samples_per_prompt, cfg.dpo_min_margin)
    scores = torch.tensor(rollout.scores, dtype=torch.float32)
    metrics: dict[str, float] = {
        "reward_mean": scores.mean().item(),
        "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
        "dpo_pairs": float(len(rows)),
        "truncated_frac": float(sum(rollout.truncated)) / max(len(rollout), 1),
    }
    if not rows:  # every prompt's samples tied: nothing to prefer
        metrics.update(kl=0.0, entropy=0.0, policy_loss=0.0, grad_norm=0.0)
        return metrics
    order = [c for c, _ in rows] + [r for _, r in rows]  # chosen rows first, then rejected
    batch = build_batch([rollout.prompt_ids[i] for i in order], [rollout.completion_ids[i] for i in order],
                        trainer.pad_id)
    ref = reference_logprobs(trainer.reference, batch, cfg.temperature).sum(1)  # (2P,)
    n_pairs = len(rows)
    pairs_per_mb = max(1, cfg.minibatch_size // 2)
    sums: dict[str, float] = {}
    count = 0
    model.train()
    for _epoch in range(cfg.ppo_epochs):
        for pair_idx in torch.randperm(n_pairs).split(pairs_per_mb):
            idx = torch.cat([pair_idx, pair_idx + n_pairs])  # (2p,) chosen then rejected rows
            out = model(batch.select(idx), cfg.temperature)
            logps = out.logprobs.sum(1)  # (2p,)
            p = len(pair_idx)
            loss_out = dpo_loss(logps[:p], logps[p:], ref[idx[:p]], ref[idx[p:]], cfg.dpo_beta)
            trainer.optimizer.zero_grad(set_to_none=True)
            loss_out.loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(trainer.params, cfg.max_grad_norm)
            trainer.optimizer.step()
            mask = batch.mask[idx]
            stats = {
                "policy_loss": loss_out.loss.item(),
                "dpo_reward_margin": (loss_out.chosen_rewards - loss_out.rejected_rewards).mean().item(),
                "dpo_accuracy": (loss_out.chosen_rewards > loss_out.rejected_rewards).float().mean().item(),
                "kl": (logps.detach() - ref[idx]).mean().item(),
                "entropy": masked_mean(out.entropy, mask).item(),
                "grad_norm": float(grad_norm),
            }
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
    trainer.scheduler.step()
    metrics.update({key: value / count for key, value in sums.items()})
    return metrics
