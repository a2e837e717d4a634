"""Ratings as direct rewards (``rating_rewards``): after each policy step, an off-policy policy-gradient
update on the rated completions the generator logged, with the behaviour logprobs it recorded.

Per real token t of a rated completion y (rating in [0, 1], ``rating_baseline`` b):

    w_t  = clip(pi_theta(y_t | x, y_<t) / mu(y_t | x, y_<t), 0, rating_ratio_clip)   (no gradient)
    loss = -mean_t( w_t * (rating - b) * log pi_theta(y_t | ...) ) + kl_coef * mean_t( w_t * k3_t )

mu is the behaviour policy (the distribution the generator sampled from, logged per token), k3 the
per-token KL(pi_theta || ref) estimator of ``ppo.kl_estimate`` and kl_coef the learner's current KL
coefficient; means run over the real tokens of the batch. ``w`` is a weight, not part of the
gradient: d loss = -w * A * d log pi, the truncated-importance-sampling policy gradient (Espeholt et
al. 2018, V-trace's rho-bar). The whole loss is scaled by ``rating_reward_weight``.

Stale completions are weighted, not skipped: ``max_policy_lag`` does not apply here. Ratings arrive at
human latency, many policy versions after the completion was sampled, so a version cutoff would drop
most of them; the per-token ratio already measures how far the current policy has moved on exactly
those tokens (a ratio near 0 silences tokens it has moved away from) and the clip bounds the variance
where it has moved towards them. The lag is reported (``rating_policy_lag_mean``).

Shapes: B rated completions, T completion tokens; ``mask`` (B, T) is 1 on real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from flywheel.feedback.records import FeedbackRecord
from flywheel.learner.models import build_batch, reference_logprobs
from flywheel.learner.ppo import kl_estimate, masked_mean

if TYPE_CHECKING:
    from flywheel.learner.trainer import Trainer


@dataclass(frozen=True)
class RatedSample:
    """One rated logged completion, as the policy update needs it."""

    event_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: list[float]
    rating: float
    """In [0, 1] (``RatingValue.score``)."""
    policy_version: int | None


def rated_samples(records: Sequence[FeedbackRecord]) -> list[RatedSample]:
    """Ratings of logged completions with prompt/completion token ids and one behaviour logprob per token;
    inline completions (no ids, no logprobs) cannot be importance-weighted and are left out."""
    samples = []
    for r in records:
        c = r.completion
        if r.rating is None or c is None or not c.token_ids or not r.prompt_token_ids:
            continue
        if len(c.behaviour_logprobs) != len(c.token_ids):
            continue
        samples.append(RatedSample(r.event_id, list(r.prompt_token_ids), list(c.token_ids),
                                   list(c.behaviour_logprobs), r.rating.score, c.policy_version))
    return samples


def clipped_ratios(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, ratio_clip: float) -> torch.Tensor:
    """w = clip(pi / mu, 0, ratio_clip) per token, no gradient: (B, T) -> (B, T)."""
    return torch.exp(logprobs.detach() - behaviour_logprobs).clamp(0.0, ratio_clip)


@dataclass
class RatingLossOut:
    loss: torch.Tensor  # scalar: pg_loss + kl_coef * kl_loss
    pg_loss: torch.Tensor  # scalar, detached
    kl_loss: torch.Tensor  # scalar, detached
    ratio_mean: torch.Tensor  # mean clipped weight over real tokens
    clipfrac: torch.Tensor  # share of real tokens whose ratio exceeded the clip


def rating_policy_loss(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    ratings: torch.Tensor,
    mask: torch.Tensor,
    baseline: float,
    ratio_clip: float,
    kl_coef: float,
) -> RatingLossOut:
    """The off-policy rating loss of the module docstring. logprobs, behaviour_logprobs, ref_logprobs,
    mask: (B, T); ratings (B,)."""
    weights = clipped_ratios(logprobs, behaviour_logprobs, ratio_clip)  # (B, T)
    advantages = (ratings - baseline)[:, None]  # (B, 1)
    pg_loss = -masked_mean(weights * advantages * logprobs, mask)
    kl_loss = masked_mean(weights * kl_estimate(logprobs, ref_logprobs, "k3"), mask)
    with torch.no_grad():
        raw = torch.exp(logprobs - behaviour_logprobs)  # (B, T)
        clipfrac = masked_mean((raw > ratio_clip).float(), mask)
        ratio_mean = masked_mean(weights, mask)
    return RatingLossOut(pg_loss + kl_coef * kl_loss, pg_loss.detach(), kl_loss.detach(), ratio_mean, clipfrac)


def rating_step(trainer: Trainer, samples: Sequence[RatedSample], policy_version: int) -> dict[str, float]:
    """One optimizer step of ``trainer.model.policy`` on ``samples`` (gradients accumulated over
    ``minibatch_size`` chunks, token-weighted so the chunks add up to the batch mean); metrics."""
    cfg, model = trainer.config, trainer.model
    lags = [policy_version - s.policy_version for s in samples if s.policy_version is not None]
    metrics = {"rating_samples": float(len(samples)),
               "rating_policy_lag_mean": sum(lags) / len(lags) if lags else 0.0}
    if not samples:
        return metrics
    batch = build_batch([s.prompt_ids for s in samples], [s.completion_ids for s in samples], trainer.pad_id)
    behaviour = torch.zeros_like(batch.mask)  # (B, T)
    for b, s in enumerate(samples):
        behaviour[b, : len(s.behaviour_logprobs)] = torch.tensor(s.behaviour_logprobs)
    ratings = torch.tensor([s.rating for s in samples], dtype=torch.float32)  # (B,)
    chunks = list(torch.arange(len(samples)).split(cfg.minibatch_size))
    ref = torch.cat([reference_logprobs(trainer.reference, batch.select(i), cfg.temperature) for i in chunks])  # (B, T)
    total_tokens = batch.mask.sum().clamp(min=1)
    sums = {"rating_loss": 0.0, "rating_pg_loss": 0.0, "rating_kl": 0.0, "rating_ratio_mean": 0.0,
            "rating_clipfrac": 0.0}
    model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    for idx in chunks:
        mb = batch.select(idx)
        out = model(mb, cfg.temperature, with_entropy=False)
        share = (mb.mask.sum() / total_tokens).item()
        loss_out = rating_policy_loss(out.logprobs, behaviour[idx], ref[idx], ratings[idx], mb.mask,
                                      cfg.rating_baseline, cfg.rating_ratio_clip, trainer.kl_ctl.value)
        (cfg.rating_reward_weight * share * loss_out.loss).backward()
        for key, value in (("rating_loss", loss_out.loss), ("rating_pg_loss", loss_out.pg_loss),
                           ("rating_kl", loss_out.kl_loss), ("rating_ratio_mean", loss_out.ratio_mean),
                           ("rating_clipfrac", loss_out.clipfrac)):
            sums[key] += share * float(value.detach())
    grad_norm = nn.utils.clip_grad_norm_(trainer.params, cfg.max_grad_norm)
    trainer.optimizer.step()
    metrics.update(sums, rating_grad_norm=float(grad_norm))
    return metrics
