"""Online DPO: the loss against a hand computation, best-vs-worst pairing, and one update on the tiny
model that moves every trainable parameter and starts at loss ln 2 (policy == reference)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from flywheel.learner.dpo import dpo_loss, preference_rows
from flywheel.learner.trainer import Rollout
from tests.unit.learner.test_trainer import _config, _rollout, _trainer


def test_dpo_loss_matches_hand_computation() -> None:
    chosen, rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    ref_chosen, ref_rejected = torch.tensor([-1.2, -2.5]), torch.tensor([-1.0, -1.1])
    out = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    # pair 0: 0.5 * ((-1.0 + 1.2) - (-1.5 + 1.0)) = 0.35; pair 1: 0.5 * ((-2.0 + 2.5) - (-1.0 + 1.1)) = 0.2
    expected = (math.log1p(math.exp(-0.35)) + math.log1p(math.exp(-0.2))) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.25])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.25, 0.05])


def test_dpo_loss_gradient_raises_chosen_and_lowers_rejected() -> None:
    chosen = torch.tensor([-1.0], requires_grad=True)
    rejected = torch.tensor([-1.0], requires_grad=True)
    dpo_loss(chosen, rejected, torch.tensor([-1.0]), torch.tensor([-1.0]), beta=0.1).loss.backward()
    # d/dx -log sigmoid(beta * x) at x = 0 is -beta / 2
    assert chosen.grad is not None and rejected.grad is not None
    assert chosen.grad.item() == pytest.approx(-0.05) and rejected.grad.item() == pytest.approx(0.05)


def test_preference_rows_pick_best_and_worst_and_skip_ties() -> None:
    rollout = Rollout(
        prompt_ids=[[1]] * 3 + [[2]] * 3 + [[3]] * 3,
        completion_ids=[[5], [6], [7], [5], [5], [8], [9], [9], [9]],
        scores=[0.1, 0.9, -0.4, 0.3, 0.3, 0.3, 1.0, 2.0, 3.0],
        truncated=[False] * 9,
    )
    # prompt 1: best row 1, worst row 2; prompt 2: all tied; prompt 3: one distinct completion.
    assert preference_rows(rollout, samples_per_prompt=3) == [(1, 2)]
    assert preference_rows(rollout, samples_per_prompt=3, min_margin=2.0) == []


def test_online_dpo_step_changes_every_parameter_and_starts_at_ln2(tmp_path: Any, tiny_llama_path: str) -> None:
    config = _config(tmp_path, tiny_llama_path, algorithm="dpo", samples_per_prompt=2, prompts_per_step=2,
                     minibatch_size=4, ppo_epochs=1, dpo_beta=0.1)
    trainer = _trainer(config)
    assert trainer.model.value_head is None and trainer.model.critic is None
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    ref_before = {n: p.detach().clone() for n, p in trainer.reference.named_parameters()}
    policy_cfg = trainer.model.policy.config
    rollout = _rollout(config, policy_cfg.vocab_size, policy_cfg.eos_token_id, seed=3)
    rollout.scores = [1.0, -1.0, -0.5, 0.5]  # both prompts give a pair
    metrics = trainer.train_step(rollout)

    assert metrics["dpo_pairs"] == 2.0 and trainer.step == 1
    # One minibatch, policy == reference before the update: every log-ratio is 0, loss = -log sigmoid(0).
    assert metrics["policy_loss"] == pytest.approx(math.log(2), abs=1e-5)
    for key in ("reward_mean", "kl", "entropy", "grad_norm", "learning_rate"):
        assert math.isfinite(metrics[key]), key
    unchanged = [n for n, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert unchanged == []
    assert all(torch.equal(p, ref_before[n]) for n, p in trainer.reference.named_parameters())
    # A second step on the same pairs: the policy now prefers the chosen completions more.
    again = trainer.train_step(rollout)
    assert again["policy_loss"] < metrics["policy_loss"] and again["dpo_reward_margin"] > 0


def test_dpo_config_needs_two_samples(tmp_path: Any, tiny_llama_path: str) -> None:
    from flywheel.common.config import ConfigError

    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        _config(tmp_path, tiny_llama_path, algorithm="dpo", samples_per_prompt=1, minibatch_size=2)
