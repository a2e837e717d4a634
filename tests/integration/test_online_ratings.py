"""Ratings in the online loop over real servers and a real Redis: a thumb submitted through the SDK on a
completion the real generator produced fits the reward model pointwise (the real reward service then
scores that completion higher) and is acked exactly once; with rating_rewards the same kind of rating
moves the policy's logprob of the rated completion in the rating's direction, and is used only once."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.server import build_server as build_feedback
from flywheel.generator.config import GeneratorConfig
from flywheel.generator.server import build_server as build_generator
from flywheel.learner import checkpoint as ckpt
from flywheel.learner.models import build_batch
from flywheel.learner.server import build_server as build_learner
from flywheel.reward.config import RewardConfig
from flywheel.reward.server import build_server as build_reward
from flywheel_client import AckStatus
from tests.integration.test_online_feedback import feedback_config, fit_records, pending, reward_scores, sdk

PROMPT = "the movie was"


@pytest.fixture
def services(server_config: dict[str, Any], start_server: Any, tiny_llama_path: str, tiny_reward_path: str,
             redis_client: Any) -> dict[str, Any]:
    return {"generator": start_server(build_generator, GeneratorConfig(**server_config, model=tiny_llama_path)),
            "reward": start_server(build_reward, RewardConfig(**server_config, model=tiny_reward_path)),
            "feedback": start_server(build_feedback, FeedbackConfig(**server_config))}


def test_a_rating_of_a_generated_completion_fits_the_reward_model_pointwise_and_is_acked_once(
    services: dict[str, Any], server_config: dict[str, Any], start_server: Any, tiny_llama_path: str,
    tiny_reward_path: str, internal_token: str, api_key: str, redis_client: Any,
) -> None:
    config = feedback_config(server_config, tiny_llama_path, tiny_reward_path, services, rm_min_new_events=1)
    server = start_server(build_learner, config)
    reward_port = services["reward"].port
    with sdk(services, api_key) as fw:
        [completion] = fw.generate(PROMPT, n=1, max_new_tokens=6, seed=5).completions
        before, version = reward_scores(reward_port, internal_token, [(PROMPT, completion.text)])
        ack = fw.rate(completion.completion_id, thumb="up")  # a lone rating: no pair, only a point
    assert ack.status is AckStatus.ACCEPTED and version == 0

    server.learner.run_step()
    [fit] = fit_records(config.run_dir)
    assert fit["event_ids"] == [ack.event_id] and (fit["train_pairs"], fit["train_points"]) == (0, 1)
    assert fit["pushed"] and fit["rm_version"] == 1
    after, version = reward_scores(reward_port, internal_token, [(PROMPT, completion.text)])
    assert version == 1 and after[0] > before[0]  # the served reward model now likes what the user liked
    assert pending(redis_client) == 0

    server.learner.run_step()  # nothing new: no second fit, nothing consumed twice
    assert len(fit_records(config.run_dir)) == 1
    exported = {s.name: s.value for m in server.registry.collect() for s in m.samples}
    assert exported["flywheel_learner_feedback_events_consumed_total"] == 1.0
    latest = ckpt.latest_checkpoint(config.checkpoint_dir)
    assert latest is not None
    assert [w["event_ids"] for w in ckpt.load_state(latest)["feedback"]["windows"]] == [[ack.event_id]]


def _logprob(learner: Any, prompt_ids: list[int], completion_ids: list[int]) -> float:
    pad_id = learner.tokenizer.pad_token_id or 0
    with torch.no_grad():
        out = learner.model(build_batch([prompt_ids], [completion_ids], pad_id), learner.config.temperature)
    return float(out.logprobs.sum())


@pytest.mark.parametrize("thumb", ["up", "down"])
def test_rating_rewards_move_the_rated_completion_in_the_rating_direction(
    thumb: str, services: dict[str, Any], server_config: dict[str, Any], start_server: Any, tiny_llama_path: str,
    tiny_reward_path: str, api_key: str, redis_client: Any,
) -> None:
    # Online DPO with a margin no score difference reaches: the policy step itself changes nothing, so
    # whatever moves the policy is the rating update.
    config = feedback_config(server_config, tiny_llama_path, tiny_reward_path, services, rating_rewards=True,
                             rm_min_new_events=1, algorithm="dpo", dpo_min_margin=1e9)
    learner = start_server(build_learner, config).learner
    with sdk(services, api_key) as fw:
        result = fw.generate(PROMPT, n=1, max_new_tokens=6, seed=11)
        [completion] = result.completions
        assert fw.rate(completion.completion_id, thumb=thumb).status is AckStatus.ACCEPTED
    before = _logprob(learner, result.prompt_token_ids, completion.token_ids)

    metrics = learner.run_step()
    assert metrics["dpo_pairs"] == 0.0 and metrics["rating_samples"] == 1.0
    assert metrics["rating_policy_lag_mean"] == 0.0 and metrics["push_replicas_ok"] == 1.0
    moved = _logprob(learner, result.prompt_token_ids, completion.token_ids) - before
    assert moved > 0 if thumb == "up" else moved < 0

    assert learner.run_step()["rating_samples"] == 0.0  # used once, then only the reward model's
    assert pending(redis_client) == 0
