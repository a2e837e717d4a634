"""One update of each algorithm on the tiny model: losses are finite and every trainable parameter moves."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from flywheel.learner.config import LearnerConfig
from flywheel.learner.models import build_batch, load_models
from flywheel.learner.trainer import Rollout, Trainer


def _config(tmp_path: Any, tiny_llama_path: str, **changes: Any) -> LearnerConfig:
    base: dict[str, Any] = dict(
        policy_model=tiny_llama_path, checkpoint_dir=str(tmp_path / "ckpt"), run_dir=str(tmp_path / "run"),
        prompts_per_step=2, samples_per_prompt=2, minibatch_size=2, ppo_epochs=1, learning_rate=1e-3,
        max_new_tokens=6,
    )
    base.update(changes)
    return LearnerConfig(**base)


def _rollout(config: LearnerConfig, vocab: int, eos: int, seed: int = 0) -> Rollout:
    rng = random.Random(seed)
    prompts, completions, scores, truncated = [], [], [], []
    for _ in range(config.prompts_per_step):
        prompt = [rng.randrange(10, vocab) for _ in range(rng.randint(2, 5))]
        for _ in range(config.samples_per_prompt):
            length = rng.randint(1, config.max_new_tokens)
            done = rng.random() < 0.5
            completion = [rng.randrange(10, vocab) for _ in range(length - 1)] + ([eos] if done else [5])
            prompts.append(prompt)
            completions.append(completion)
            scores.append(rng.uniform(-1, 1))
            truncated.append(not done)
    return Rollout(prompts, completions, scores, truncated)


def _trainer(config: LearnerConfig) -> Trainer:
    torch.manual_seed(0)
    model, reference, tokenizer = load_models(config.policy_model, config.shared_backbone, config.uses_critic)
    return Trainer(config, model, reference, pad_id=tokenizer.pad_token_id)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("algorithm", "shared"),
    [("ppo", False), ("ppo", True), ("grpo", False), ("rloo", False), ("rebel", False)],
)
def test_one_step_changes_every_trainable_parameter(
    algorithm: str, shared: bool, tmp_path: Any, tiny_llama_path: str
) -> None:
    config = _config(tmp_path, tiny_llama_path, algorithm=algorithm, shared_backbone=shared)
    trainer = _trainer(config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    ref_before = {n: p.detach().clone() for n, p in trainer.reference.named_parameters()}
    rollout = _rollout(config, trainer.model.policy.config.vocab_size, trainer.model.policy.config.eos_token_id)
    metrics = trainer.train_step(rollout)

    assert trainer.step == 1
    for key in ("reward_mean", "kl", "entropy", "policy_loss", "grad_norm"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    if algorithm == "ppo":
        assert "value_loss" in metrics and "clipfrac" in metrics and "approx_kl" in metrics
        assert (trainer.model.critic is None) == shared
    else:
        assert trainer.model.value_head is None and trainer.model.critic is None
    unchanged = [n for n, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert unchanged == []
    # The reference stays frozen.
    assert all(torch.equal(p, ref_before[n]) for n, p in trainer.reference.named_parameters())


def test_first_epoch_old_logprobs_equal_current_policy(tmp_path: Any, tiny_llama_path: str) -> None:
    """Before any update the ratio is exactly 1 (no dropout, same temperature), so approx_kl starts at 0."""
    config = _config(tmp_path, tiny_llama_path, temperature=0.7)
    trainer = _trainer(config)
    rollout = _rollout(config, trainer.model.policy.config.vocab_size, trainer.model.policy.config.eos_token_id)
    exp, metrics = trainer.make_experience(rollout)
    trainer.model.train()
    out = trainer.model(exp.batch, config.temperature)
    torch.testing.assert_close(out.logprobs, exp.old_logprobs)
    # Same weights as the reference: KL is 0 before training.
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-5)
    # Logprobs are under logits / temperature, 0 on padding.
    assert (exp.old_logprobs[exp.batch.mask == 0] == 0).all()


def test_batch_positions_pick_completion_tokens() -> None:
    batch = build_batch([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 7, 8], [4, 9, 10, 11, 0]]
    assert batch.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    from flywheel.learner.models import completion_positions

    # token 7 is predicted by the logits at column 2 (token 3); token 9 by column 0
    assert completion_positions(batch).tolist() == [[2, 3, 4], [0, 1, 2]]


def test_missing_eos_penalty_lowers_truncated_scores(tmp_path: Any, tiny_llama_path: str) -> None:
    config = _config(tmp_path, tiny_llama_path, algorithm="rebel", missing_eos_penalty=-1.0, init_kl_coef=0.0)
    trainer = _trainer(config)
    rollout = _rollout(config, trainer.model.policy.config.vocab_size, 0)
    exp, _ = trainer.make_experience(rollout)
    expected = torch.tensor(rollout.scores) - torch.tensor(rollout.truncated, dtype=torch.float32)
    torch.testing.assert_close(exp.scores, expected)
