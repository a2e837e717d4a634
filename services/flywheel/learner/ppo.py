"""The RL math, in pure torch: advantages, losses and the KL controller.

Names follow the papers: GAE (Schulman et al. 2016) with ``gamma``/``gae_lambda``, the clipped
surrogate and clipped value loss (PPO, Schulman et al. 2017; "The N Implementation Details of RLHF
with PPO", Huang et al. 2024), the adaptive KL controller (Ziegler et al. 2019), group baselines
(GRPO, Shao et al. 2024; RLOO, Ahmadian et al. 2024) and REBEL (Gao et al. 2024).

Shapes: B samples, T completion tokens. ``mask`` (B, T) is 1 on real completion tokens (up to and
including EOS) and 0 on padding; every reduction over tokens is a masked one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (over everything, or along ``dim``)."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries (padding stays 0)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token: logits (B, T, V), tokens (B, T) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's distribution: (B, T, V) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return -(logp.exp() * logp).sum(-1)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's k1/k3 estimators).

    k1 = log pi - log ref (unbiased, can be negative); k3 = (r - 1) - log r with r = ref / pi
    (unbiased, always >= 0, lower variance).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"estimator={estimator!r}: use 'k1' or 'k3'")


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL at every token, plus the sequence score at the last real token.

    scores (B,), kl (B, T), mask (B, T) -> (B, T).
    """
    rewards = -kl_coef * kl * mask  # (B, T)
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) index of the last real token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each completion, bootstrapping 0 after the last token.

    rewards, values, mask: (B, T). Returns (advantages, returns), both (B, T), 0 on padding.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * gae_lambda * last_gae
        last_gae = last_gae * mask[:, t]  # padding carries nothing back
        advantages[:, t] = last_gae
    returns = advantages + values
    return advantages * mask, returns * mask


def group_advantages(scores: torch.Tensor, group_size: int, baseline: str) -> torch.Tensor:
    """Critic-free sequence advantages with samples of the same prompt adjacent: (B,) -> (B,).

    ``grpo``: (r - group mean) / (group std + eps). ``rloo``: r minus the mean of the *other*
    samples of the group (leave-one-out), unbiased.
    """
    groups = scores.view(-1, group_size)  # (P, G)
    if baseline == "grpo":
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        return ((groups - groups.mean(1, keepdim=True)) / (std + 1e-4)).reshape(-1)
    if baseline == "rloo":
        others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)  # (P, G)
        return (groups - others).reshape(-1)
    raise ValueError(f"baseline={baseline!r}: use 'grpo' or 'rloo'")


@dataclass
class PolicyLossOut:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_coef: float,
) -> PolicyLossOut:
    """PPO's clipped surrogate, averaged over real tokens. All inputs (B, T)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg_loss2 > pg_loss1).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)  # k3 of old || new
    return PolicyLossOut(loss, clipfrac, approx_kl)


# --- decoupled PPO (Hilton et al. 2022, "Batch size-invariance for policy optimization") ----------
# Async rollouts come from a *behaviour* policy (the version the generator served) that may lag the
# *proximal* policy (the learner's weights when the update starts, whose logprobs are recomputed).
# The objective separates the two: an importance weight pi_prox / pi_behav corrects for off-policy
# data, and the clipped surrogate keeps pi_theta near pi_prox (not near the stale behaviour policy):
#   L = E_behav[ w * max(-A * r, -A * clip(r, 1 - eps, 1 + eps)) ],  w = pi_prox / pi_behav,
#   r = pi_theta / pi_prox.
# With behaviour == proximal, w = 1 and this is exactly ``clipped_policy_loss``.


def behaviour_importance_weights(
    prox_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, cap: float
) -> torch.Tensor:
    """w = pi_prox / pi_behav per token, truncated at ``cap`` (V-trace's rho-bar; 0 = no cap). (B, T), no grad."""
    weights = torch.exp(prox_logprobs.detach() - behaviour_logprobs.detach())
    return weights.clamp(max=cap) if cap > 0 else weights


def decoupled_policy_loss(
    logprobs: torch.Tensor,
    prox_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_coef: float,
    weight_cap: float = 0.0,
    sample_weights: torch.Tensor | None = None,
) -> PolicyLossOut:
    """Decoupled clipped surrogate, averaged over real tokens. Inputs (B, T); ``sample_weights`` (B,)
    scale each sample's contribution (stale samples down-weighted) without renormalising."""
    weights = behaviour_importance_weights(prox_logprobs, behaviour_logprobs, weight_cap)  # (B, T)
    if sample_weights is not None:
        weights = weights * sample_weights[:, None]
    log_ratio = logprobs - prox_logprobs.detach()
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    loss = masked_mean(weights * torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg_loss2 > pg_loss1).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)  # k3 of prox || new
    return PolicyLossOut(loss, clipfrac, approx_kl)


def behaviour_kl(behaviour_logprobs: torch.Tensor, prox_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(pi_behav || pi_prox) from the behaviour samples: per-token k3, summed over each completion,
    averaged over samples (the convention of the ``kl`` metric). Scalar, >= 0."""
    per_token = kl_estimate(behaviour_logprobs, prox_logprobs, "k3") * mask  # (B, T)
    return per_token.sum(1).mean()


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_vf: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((V - R)^2, (V_clipped - R)^2), averaged over real tokens; returns (loss, clipfrac)."""
    values_clipped = old_values + torch.clamp(values - old_values, -clip_vf, clip_vf)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_loss1, vf_loss2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((vf_loss2 > vf_loss1).float(), mask)
    return loss, clipfrac


def rebel_loss(
    seq_log_ratio: torch.Tensor, scores: torch.Tensor, eta: float
) -> torch.Tensor:
    """REBEL: regress (1/eta) * (log-ratio(y) - log-ratio(y')) onto r(y) - r(y') for adjacent pairs.

    seq_log_ratio (B,) = sum over tokens of log pi_theta - log pi_t (the iterate that sampled them);
    scores (B,). Samples 2k and 2k+1 form a pair.
    """
    pairs = seq_log_ratio.view(-1, 2)  # (B/2, 2)
    reward_pairs = scores.view(-1, 2)  # (B/2, 2)
    predicted = (pairs[:, 0] - pairs[:, 1]) / eta
    target = reward_pairs[:, 0] - reward_pairs[:, 1]
    return ((predicted - target) ** 2).mean()


class AdaptiveKLController:
    """Ziegler et al. (2019): kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_samples / horizon.

    With ``target`` 0 the coefficient stays fixed.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        if self.target <= 0 or not math.isfinite(current_kl):
            return
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_samples / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
