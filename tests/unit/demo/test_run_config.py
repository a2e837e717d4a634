"""The demo's cluster settings: the learner learns from feedback, the reward service scores with the
reward model only, the hidden preference goes nowhere, and the evaluation prompts are fresh."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.common.config import load_config
from flywheel.demo.evaluation import split_prompts
from flywheel.demo.run import DemoConfig, DemoError, cluster_env, learner_settings
from flywheel.learner.config import LearnerConfig
from flywheel.reward.config import RewardConfig


def _env(tmp_path: Path, cfg: DemoConfig) -> dict[str, str]:
    policy, rm = tmp_path / "policy", tmp_path / "rm"
    learner = learner_settings(cfg, policy, rm, tmp_path / "prompts.jsonl", tmp_path)
    return cluster_env(learner, policy, rm)


def test_services_accept_the_demo_settings_and_learn_from_feedback(tmp_path: Path) -> None:
    env = _env(tmp_path, DemoConfig(steps=7))
    learner = load_config(LearnerConfig, "learner", environ=env)
    assert learner.feedback_learning and learner.total_steps == 7 and not learner.autostart
    assert learner.reward_model == str(tmp_path / "rm") == env["FLYWHEEL_REWARD_MODEL"]
    assert learner.policy_model == str(tmp_path / "policy") == env["FLYWHEEL_GENERATOR_MODEL"]
    assert learner.checkpoint_dir == str(tmp_path / "checkpoints")  # never resumes another run
    reward = load_config(RewardConfig, "reward", environ=env)
    assert [spec.kind for spec in reward.scorer_sets()["default"]] == ["model"]


def test_the_hidden_preference_is_not_passed_to_any_service(tmp_path: Path) -> None:
    env = _env(tmp_path, DemoConfig(preference="positive_sentiment"))
    assert not any("SCORER" in key for key in env)
    assert not any("sentiment" in value or "vader" in value.lower() for value in env.values())


def test_unknown_learner_overrides_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match="unknown learner settings"):
        _env(tmp_path, DemoConfig(learner={"no_such_field": "1"}))


def test_evaluation_prompts_are_held_out_whole_subjects() -> None:
    split = split_prompts(seed=0)
    assert len(split.heldout) == 28 and len(split.train) == 77
    assert not set(split.heldout) & set(split.train)
    held_subjects = {p.rsplit(" ", 1)[0] for p in split.heldout}
    assert not any(p.startswith(tuple(s + " " for s in held_subjects)) for p in split.train)
    assert split_prompts(seed=0) == split
