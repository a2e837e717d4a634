"""The RL math against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from flywheel.learner.ppo import (
    AdaptiveKLController,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    group_advantages,
    kl_estimate,
    masked_whiten,
    rebel_loss,
    token_rewards,
)


def test_gae_four_steps_matches_hand_computation() -> None:
    # Row 0: four real tokens. gamma=0.9, lambda=0.5, so gamma*lambda = 0.45.
    #   t3: delta = 1 - 0.8 = 0.2                      A3 = 0.2
    #   t2: delta = 0.9*0.8 - 0.7 = 0.02               A2 = 0.02 + 0.45*0.2  = 0.11
    #   t1: delta = 0.9*0.7 - 0.6 = 0.03               A1 = 0.03 + 0.45*0.11 = 0.0795
    #   t0: delta = 0.1 + 0.9*0.6 - 0.5 = 0.14         A0 = 0.14 + 0.45*0.0795 = 0.175775
    # Row 1: two real tokens then padding whose (large) rewards and values must be ignored.
    #   t1: delta = 1 - 0.6 = 0.4; t0: delta = 0.9*0.6 - 0.5 = 0.04, A0 = 0.04 + 0.45*0.4 = 0.22
    rewards = torch.tensor([[0.1, 0.0, 0.0, 1.0], [0.0, 1.0, 5.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 0.8], [0.5, 0.6, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, gae_lambda=0.5)
    expected = torch.tensor([[0.175775, 0.0795, 0.11, 0.2], [0.22, 0.4, 0.0, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)


def test_token_rewards_put_score_on_last_real_token_and_kl_everywhere() -> None:
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 1.85], [-1.25, 0.0, 0.0]]))


@pytest.mark.parametrize(
    ("ratio", "advantage", "loss", "clipped", "has_grad"),
    [
        (1.2, 1.0, -1.2, 0.0, True),  # exactly at the boundary: not clipped, gradient flows
        (1.3, 1.0, -1.2, 1.0, False),  # beyond it with A>0: clipped, no gradient
        (0.7, 1.0, -0.7, 0.0, True),  # below with A>0: the pessimistic unclipped term wins
        (0.7, -1.0, 0.8, 1.0, False),  # below with A<0: clipped
        (1.3, -1.0, 1.3, 0.0, True),  # above with A<0: unclipped, the gradient pushes it back
    ],
)
def test_clipped_surrogate_at_and_around_the_clip_boundary(
    ratio: float, advantage: float, loss: float, clipped: float, has_grad: bool
) -> None:
    logprobs = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    out = clipped_policy_loss(
        logprobs, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([[advantage]], dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.float64), clip_coef=0.2,
    )
    assert out.loss.item() == pytest.approx(loss)
    assert out.clipfrac.item() == clipped
    out.loss.backward()
    assert logprobs.grad is not None
    assert (logprobs.grad.abs().item() > 0) == has_grad
    # approx_kl is the k3 estimate of KL(old || new): (r - 1) - log r
    assert out.approx_kl.item() == pytest.approx((ratio - 1) - math.log(ratio))


def test_clipped_value_loss_takes_the_larger_error() -> None:
    # old 1.0, new 1.5 clipped to 1.2; return 2.0: (1.5-2)^2 = 0.25 < (1.2-2)^2 = 0.64 -> 0.5*0.64
    loss, clipfrac = clipped_value_loss(
        torch.tensor([[1.5, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]]),
        torch.tensor([[1.0, 0.0]]), clip_vf=0.2,
    )
    assert loss.item() == pytest.approx(0.32)
    assert clipfrac.item() == 1.0


def test_kl_estimators() -> None:
    logprobs = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    assert kl_estimate(logprobs, ref, "k1").item() == pytest.approx(math.log(2))
    # k3 with r = ref/pi = 0.5: (r - 1) - log r = -0.5 + log 2
    assert kl_estimate(logprobs, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    assert kl_estimate(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logprobs, ref, "k2")


def test_kl_estimators_are_unbiased_on_samples() -> None:
    torch.manual_seed(0)
    pi = torch.tensor([0.7, 0.2, 0.1])
    ref = torch.tensor([0.4, 0.4, 0.2])
    exact = (pi * (pi / ref).log()).sum().item()
    tokens = torch.multinomial(pi, 200_000, replacement=True)
    lp, lr = pi.log()[tokens], ref.log()[tokens]
    assert kl_estimate(lp, lr, "k1").mean().item() == pytest.approx(exact, abs=5e-3)
    assert kl_estimate(lp, lr, "k3").mean().item() == pytest.approx(exact, abs=5e-3)


def test_group_baselines() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    grpo = group_advantages(scores, 3, "grpo")
    torch.testing.assert_close(grpo, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (1 + 1e-4))
    rloo = group_advantages(scores, 3, "rloo")  # r_i - mean of the other two
    torch.testing.assert_close(rloo, torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))


def test_rebel_loss_regresses_scaled_log_ratio_difference_onto_reward_difference() -> None:
    # pair (0.3, 0.1), rewards (1, 0), eta 0.5: ((0.3 - 0.1) / 0.5 - (1 - 0))^2 = 0.36
    loss = rebel_loss(torch.tensor([0.3, 0.1]), torch.tensor([1.0, 0.0]), eta=0.5)
    assert loss.item() == pytest.approx(0.36)


def test_masked_whiten_ignores_padding() -> None:
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    out = masked_whiten(values, mask)
    real = out[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.pow(2).mean().item() == pytest.approx(1.0, abs=1e-4)
    assert out[~mask.bool()].abs().sum().item() == 0.0


def test_adaptive_kl_controller() -> None:
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=12.0, n_samples=100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10_000))
    ctl.update(current_kl=3.0, n_samples=100)  # error -0.5 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.01) * (1 - 0.2 * 0.01))
    fixed = AdaptiveKLController(0.1, target=0.0, horizon=10_000)
    fixed.update(100.0, 100)
    assert fixed.value == 0.1
