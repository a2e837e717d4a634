"""Async mode's pieces: decoupled PPO against hand-computed values, the staleness filter, and one
async trainer update on the tiny model."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from flywheel.common.config import ConfigError
from flywheel.learner.async_rollouts import SampleGroup, select_groups
from flywheel.learner.config import LearnerConfig
from flywheel.learner.ppo import (
    behaviour_importance_weights,
    behaviour_kl,
    clipped_policy_loss,
    decoupled_policy_loss,
)
from flywheel.learner.prompts import PromptItem
from tests.unit.learner.test_trainer import _config, _rollout, _trainer

LN = math.log


# Two tokens of one sample (clip_coef 0.1):
#   t0: pi_prox 0.5, pi_behav 0.25 -> w = 2;   pi_theta 0.6  -> r = 1.2,  A = 1
#       -A*r = -1.2, -A*clip(r) = -1.1 -> max -1.1 (clipped), weighted -2.2 (-1.65 with cap 1.5)
#   t1: pi_prox 0.4, pi_behav 0.5  -> w = 0.8; pi_theta 0.38 -> r = 0.95, A = -2
#       -A*r = 1.9 = -A*clip(r) -> 1.9 (not clipped), weighted 1.52
PROX = torch.tensor([[LN(0.5), LN(0.4)]])
BEHAV = torch.tensor([[LN(0.25), LN(0.5)]])
THETA = torch.tensor([[LN(0.6), LN(0.38)]])
ADV = torch.tensor([[1.0, -2.0]])
MASK = torch.ones(1, 2)


def test_importance_weights_are_prox_over_behaviour_and_truncated_at_the_cap() -> None:
    torch.testing.assert_close(behaviour_importance_weights(PROX, BEHAV, 0.0), torch.tensor([[2.0, 0.8]]))
    torch.testing.assert_close(behaviour_importance_weights(PROX, BEHAV, 1.5), torch.tensor([[1.5, 0.8]]))


def test_decoupled_loss_matches_hand_computation() -> None:
    out = decoupled_policy_loss(THETA, PROX, BEHAV, ADV, MASK, clip_coef=0.1)
    torch.testing.assert_close(out.loss, torch.tensor((-2.2 + 1.52) / 2))
    torch.testing.assert_close(out.clipfrac, torch.tensor(0.5))
    capped = decoupled_policy_loss(THETA, PROX, BEHAV, ADV, MASK, clip_coef=0.1, weight_cap=1.5)
    torch.testing.assert_close(capped.loss, torch.tensor((-1.65 + 1.52) / 2))
    halved = decoupled_policy_loss(THETA, PROX, BEHAV, ADV, MASK, clip_coef=0.1,
                                   sample_weights=torch.tensor([0.5]))
    torch.testing.assert_close(halved.loss, torch.tensor((-2.2 + 1.52) / 4))


def test_decoupled_gradient_flows_through_the_proximal_ratio_only() -> None:
    theta = THETA.clone().requires_grad_(True)
    decoupled_policy_loss(theta, PROX, BEHAV, ADV, MASK, clip_coef=0.1).loss.backward()
    # t0 is clipped: no gradient. t1: d/dlogp [w * -A * exp(logp - prox)] / 2 = 0.8 * 2 * 0.95 / 2.
    assert theta.grad is not None
    torch.testing.assert_close(theta.grad, torch.tensor([[0.0, 0.76]]))


def test_decoupled_equals_ppo_when_behaviour_is_the_proximal_policy() -> None:
    torch.manual_seed(0)
    prox, adv = torch.randn(3, 5) - 2, torch.randn(3, 5)
    mask = torch.tensor([[1.0] * 5, [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    a = (prox + 0.3 * torch.randn(3, 5)).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    ours = decoupled_policy_loss(a, prox, prox, adv, mask, clip_coef=0.2, weight_cap=2.0)
    ppo = clipped_policy_loss(b, prox, adv, mask, clip_coef=0.2)
    ours.loss.backward()
    ppo.loss.backward()
    torch.testing.assert_close(ours.loss, ppo.loss)
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(ours.clipfrac, ppo.clipfrac)


def test_behaviour_kl_is_k3_summed_over_tokens() -> None:
    # r = prox / behav: t0 r = 2 -> 1 - ln 2; t1 r = 0.8 -> -0.2 - ln 0.8.
    expected = (1 - LN(2)) + (-0.2 - LN(0.8))
    torch.testing.assert_close(behaviour_kl(BEHAV, PROX, MASK), torch.tensor(expected))
    assert behaviour_kl(PROX, PROX, MASK).item() == 0.0


# --- the staleness filter ---------------------------------------------------------------------------
def _group(version: int, n: int = 2) -> SampleGroup:
    return SampleGroup(PromptItem(f"p{version}"), [[1]] * n, [[2]] * n, ["x"] * n, [[-1.0]] * n, [False] * n,
                       [version] * n, [0.0] * n, 0)


def test_drop_discards_groups_over_the_lag_and_waits_for_a_full_step() -> None:
    buffer = [_group(3), _group(4), _group(5)]
    selection, rest, dropped = select_groups(buffer, 5, 2, 1, "drop", 0.5)
    assert selection is not None
    assert selection.sample_versions == [4, 4, 5, 5] and selection.lags == [1, 1, 0, 0]
    assert selection.sample_weights == [] and rest == [] and dropped == [2, 2]
    # Too few fresh groups: nothing selected, the fresh ones are kept for the next batch.
    selection, rest, dropped = select_groups([_group(2), _group(5)], 5, 2, 1, "drop", 0.5)
    assert selection is None and [g.policy_versions[0] for g in rest] == [5] and dropped == [3, 3]


def test_downweight_keeps_stale_groups_with_geometric_weights() -> None:
    selection, rest, dropped = select_groups([_group(2), _group(3), _group(5)], 5, 3, 1, "downweight", 0.5)
    assert selection is not None and rest == [] and dropped == []
    assert selection.lags == [3, 3, 2, 2, 0, 0]
    assert selection.sample_weights == [0.25, 0.25, 0.5, 0.5, 1.0, 1.0]
    assert selection.rollout().sample_weights == selection.sample_weights


def test_a_group_is_as_stale_as_its_oldest_sample() -> None:
    mixed = _group(5)
    mixed.policy_versions = [5, 3]
    selection, rest, dropped = select_groups([mixed, _group(5)], 5, 1, 1, "drop", 0.5)
    assert selection is not None and selection.sample_versions == [5, 5] and dropped == [2, 2] and rest == []


def test_config_rejects_bad_async_settings(tmp_path: Any) -> None:
    for changes in ({"mode": "fast"}, {"stale_policy": "keep"}, {"max_policy_lag": -1}, {"rollout_prefetch": 0},
                    {"stale_downweight": 0.0}, {"guard_enabled": True, "keep_policy_snapshots": 0}):
        with pytest.raises(ConfigError):
            LearnerConfig(**changes)  # type: ignore[arg-type]


# --- one async update on the tiny model --------------------------------------------------------------
def test_async_update_reports_behaviour_kl_and_trains_every_parameter(tmp_path: Any, tiny_llama_path: str) -> None:
    config = _config(tmp_path, tiny_llama_path, mode="async")
    trainer = _trainer(config)
    vocab = int(trainer.model.policy.config.vocab_size)  # type: ignore[union-attr]
    rollout = _rollout(config, vocab, eos=2)
    exp, _ = trainer.make_experience(rollout)
    # Behaviour logprobs = the recomputed ones (on-policy): KL 0. Shifted ones: KL > 0.
    mask = exp.batch.mask
    rollout.behaviour_logprobs = [exp.old_logprobs[b, : int(mask[b].sum())].tolist() for b in range(len(rollout))]
    assert trainer.make_experience(rollout)[1]["behaviour_kl"] == pytest.approx(0.0, abs=1e-6)
    rollout.behaviour_logprobs = [[lp - 0.3 for lp in row] for row in rollout.behaviour_logprobs]
    rollout.sample_weights = [1.0, 0.5, 1.0, 0.25]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = trainer.train_step(rollout)
    assert metrics["behaviour_kl"] > 0.01 and math.isfinite(metrics["policy_loss"])
    unchanged = [n for n, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert unchanged == []
