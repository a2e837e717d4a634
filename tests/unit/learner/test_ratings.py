"""Ratings in the learner: pointwise reward-model targets (the losses against hand-computed values, the
held-out split, a fit on lone ratings with the tiny reward model and a real Redis) and ratings as direct
rewards (the off-policy loss against hand-computed values, the update on the tiny policy, and the
exactly-once bookkeeping of the ratings it used)."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from flywheel.common.config import ConfigError
from flywheel.common.health import free_port
from flywheel.feedback.records import CompletionRecord, FeedbackRecord, RatingValue
from flywheel.learner.config import LearnerConfig
from flywheel.learner.feedback_learning import (
    FeedbackLearning,
    encode,
    records_to_pairs,
    records_to_points,
    reward_model_loss,
    score_rows,
    split_window,
)
from flywheel.learner.metrics import LearnerMetrics
from flywheel.learner.offpolicy import (
    RatedSample,
    clipped_ratios,
    rated_samples,
    rating_policy_loss,
    rating_step,
)
from tests.unit.learner.test_feedback_learning import comparison, pending, rating, store

LN2 = math.log(2.0)


def with_ids(records: list[FeedbackRecord]) -> list[FeedbackRecord]:
    for i, r in enumerate(records):
        object.__setattr__(r, "event_id", f"{i + 1}-0")
    return records


def scalar(key: str, prompt: str, text: str, value: float) -> FeedbackRecord:
    return FeedbackRecord(kind="rating", idempotency_key=key, client="tests", prompt=prompt,
                          completion=CompletionRecord(text, completion_id=key),
                          rating=RatingValue(value=value, min=1.0, max=5.0))


# --- pointwise reward-model targets ------------------------------------------------------------
def test_ratings_become_points_thumbs_and_normalised_scalars() -> None:
    records = with_ids([rating("u", "Q", "fine", "up"), comparison(1), rating("d", "Q", "rude", "down"),
                        scalar("s", "R", "ok", 4.0)])
    points = records_to_points(records)
    assert [(p["completion"], p["target"], p["event_ids"]) for p in points] == [
        ("fine", 1.0, ["1-0"]), ("rude", 0.0, ["3-0"]), ("ok", 0.75, ["4-0"])]
    assert len(records_to_pairs(records)) == 2  # the two thumbs of Q still form a best-vs-worst pair


def test_reward_model_loss_matches_hand_computed_values() -> None:
    one, zero = torch.tensor([1.0]), torch.tensor([0.0])
    empty = torch.zeros(0)
    bt = math.log1p(math.exp(-1.0))  # -log sigmoid(1 - 0 - 0)
    assert reward_model_loss(one, zero, zero, empty, empty, 0.5).item() == pytest.approx(bt)
    assert reward_model_loss(one, zero, torch.tensor([1.0]), empty, empty, 0.5).item() == pytest.approx(LN2)
    # BCE(sigmoid(0), 1) = ln 2, weighted 0.5; BCE(sigmoid(2), 0.75) = softplus(2) - 0.75 * 2.
    assert reward_model_loss(one, zero, zero, zero, one, 0.5).item() == pytest.approx(bt + 0.5 * LN2)
    point = reward_model_loss(empty, empty, empty, torch.tensor([2.0]), torch.tensor([0.75]), 1.0).item()
    assert point == pytest.approx(math.log1p(math.exp(2.0)) - 1.5)
    assert reward_model_loss(empty, empty, empty, zero, one, 0.0).item() == 0.0  # weight 0: ratings only pair


def test_split_window_keeps_every_event_on_one_side() -> None:
    records = with_ids([comparison(1), rating("a", "Q", "fine", "up"), comparison(2), rating("b", "Q", "rude", "down"),
                        rating("lone", "R", "meh", "up")])
    pairs, points = records_to_pairs(records), records_to_points(records)
    train, train_points, held, held_points = split_window(records, pairs, points, 0.4)
    # Items in order: c1, point a, c2, point b, pair(a, b), point lone -> the newest two held out.
    assert [p["event_ids"] for p in held_points] == [["5-0"]]
    assert [p["event_ids"] for p in held] == [["2-0", "4-0"]]
    assert [p["event_ids"] for p in train] == [["1-0"], ["3-0"]]
    assert [p["event_ids"] for p in train_points] == []  # a and b are in the held-out pair: dropped from training
    train_ids = {e for it in train + train_points for e in it["event_ids"]}
    assert not train_ids & {e for it in held + held_points for e in it["event_ids"]}
    assert split_window(records, pairs, points, 0.0) == (pairs, points, [], [])


def _learning(redis_client: Any, tiny_reward_path: str, **changes: Any) -> FeedbackLearning:
    base: dict[str, Any] = dict(feedback_learning=True, reward_model=tiny_reward_path, rm_fit_every_steps=1,
                                rm_min_new_events=4, feedback_batch=4, rm_max_steps=4, rm_learning_rate=1e-3,
                                rm_holdout_fraction=0.0, reward_target=f"127.0.0.1:{free_port()}", rpc_timeout=1.0)
    base.update(changes)
    learning = FeedbackLearning(LearnerConfig(**base), LearnerMetrics(CollectorRegistry()), redis_client)
    learning.load()
    return learning


def _scores(learning: FeedbackLearning, rows: list[tuple[str, str]]) -> list[float]:
    with torch.no_grad():
        ids = [encode(learning.tokenizer, p, c, 512) for p, c in rows]
        return score_rows(learning.model, learning.tokenizer, ids).tolist()


def test_lone_ratings_fit_the_reward_model_pointwise_and_are_acked_after_the_checkpoint(
    redis_client: Any, tiny_reward_path: str
) -> None:
    rated = [("How was it 0?", "lovely", "up"), ("How was it 1?", "dreadful", "down"),
             ("How was it 2?", "superb", "up"), ("How was it 3?", "boring", "down")]
    ids = store(redis_client, [rating(f"r{i}", p, c, t) for i, (p, c, t) in enumerate(rated)])
    learning = _learning(redis_client, tiny_reward_path)
    before = _scores(learning, [(p, c) for p, c, _ in rated])
    fit = learning.maybe_fit(1, threading.RLock())
    assert fit is not None and fit.pushed and (fit.train_pairs, fit.train_points) == (0, 4)
    after = _scores(learning, [(p, c) for p, c, _ in rated])
    moved = [a - b for a, b in zip(after, before, strict=True)]
    assert moved[0] > 0 and moved[1] < 0 and moved[2] > 0 and moved[3] < 0  # toward each rating
    assert pending(redis_client) == 4
    learning.after_checkpoint(learning.state_dict())
    assert pending(redis_client) == 0 and learning.consumed_total == 4
    assert learning.windows[-1]["event_ids"] == ids and learning.windows[-1]["train_points"] == 4


def test_held_out_ratings_report_pointwise_accuracy_and_gate_a_ratings_only_window(
    redis_client: Any, tiny_reward_path: str
) -> None:
    learning = _learning(redis_client, tiny_reward_path, rm_holdout_fraction=0.25, rm_max_steps=30,
                         rm_learning_rate=3e-3)
    [current] = _scores(learning, [("Q9", "nice")])
    agrees, contradicts = ("up", "down") if current > 0 else ("down", "up")
    # The (older) training ratings contradict the current model; the newest, held out, agrees with it.
    store(redis_client, [rating(f"t{i}", f"Q{i}", "nice", contradicts) for i in range(3)]
          + [rating("h", "Q9", "nice", agrees)])
    fit = learning.maybe_fit(1, threading.RLock())
    assert fit is not None and (fit.train_points, fit.heldout_points, fit.heldout_pairs) == (3, 1, 0)
    assert fit.previous_pointwise_accuracy == 1.0 and fit.heldout_pointwise_accuracy == 0.0
    assert not fit.pushed and "pointwise accuracy" in fit.reason and learning.rm_version == 0


# --- ratings as direct rewards -------------------------------------------------------------------
def test_clipped_ratios_and_rating_loss_match_hand_computed_values() -> None:
    logprobs = torch.log(torch.tensor([[0.5, 0.25], [0.5, 1.0]]))  # (2, 2); row 1 has one real token
    behaviour = torch.log(torch.tensor([[0.25, 0.25], [1.0, 1.0]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert clipped_ratios(logprobs, behaviour, 1.5)[0].tolist() == pytest.approx([1.5, 1.0])  # 2 -> clipped
    assert clipped_ratios(logprobs, behaviour, 1.5)[1, 0].item() == pytest.approx(0.5)
    ratings = torch.tensor([1.0, 0.0])  # thumb up, thumb down; baseline 0.5 -> advantages +-0.5
    out = rating_policy_loss(logprobs.clone().requires_grad_(), behaviour, logprobs, ratings, mask, 0.5, 1.5, 0.1)
    # Tokens: -(1.5 * 0.5 * ln .5), -(1 * 0.5 * ln .25), -(0.5 * -0.5 * ln .5): sum ln 2 * 1.5, mean ln 2 / 2.
    assert out.pg_loss.item() == pytest.approx(LN2 / 2)
    assert out.kl_loss.item() == pytest.approx(0.0)  # reference == policy
    assert out.clipfrac.item() == pytest.approx(1 / 3) and out.ratio_mean.item() == pytest.approx(1.0)

    lp = torch.log(torch.tensor([[0.5]])).requires_grad_()
    kl_out = rating_policy_loss(lp, torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]])),
                                torch.tensor([0.75]), torch.ones(1, 1), 0.5, 2.0, 0.1)
    k3 = math.expm1(-LN2) + LN2  # r = ref / pi = 1/2
    assert kl_out.kl_loss.item() == pytest.approx(k3)
    assert kl_out.loss.item() == pytest.approx(-0.25 * math.log(0.5) + 0.1 * k3)
    kl_out.loss.backward()
    # d/dlp: -w * A (the weight carries no gradient) + kl_coef * d k3/dlp = -0.25 + 0.1 * (1 - ref/pi).
    assert lp.grad is not None and lp.grad.item() == pytest.approx(-0.25 + 0.1 * 0.5)


def _logged(key: str, thumb: str, ids: list[int], logprobs: list[float], version: int | None = 0) -> FeedbackRecord:
    return FeedbackRecord(kind="rating", idempotency_key=key, client="tests", prompt="the movie was",
                          prompt_token_ids=[1, 5, 6], rating=RatingValue(thumb=thumb),
                          completion=CompletionRecord("x", completion_id=key, token_ids=ids,
                                                      behaviour_logprobs=logprobs, policy_version=version))


def test_rated_samples_need_token_ids_and_one_behaviour_logprob_per_token() -> None:
    records = with_ids([_logged("a", "up", [7, 8], [-1.0, -2.0]), _logged("b", "down", [7, 8], [-1.0]),
                        rating("inline", "Q", "text only", "up")])
    [sample] = rated_samples(records)
    assert sample == RatedSample("1-0", [1, 5, 6], [7, 8], [-1.0, -2.0], 1.0, 0)


def _sequence_logprob(trainer: Any, sample: RatedSample) -> float:
    from flywheel.learner.models import build_batch

    with torch.no_grad():
        batch = build_batch([sample.prompt_ids], [sample.completion_ids], trainer.pad_id)
        return float(trainer.model(batch, 1.0).logprobs.sum())


def test_rating_step_moves_thumbs_up_up_and_thumbs_down_down(tiny_llama_path: str) -> None:
    from flywheel.learner.models import build_batch, load_models
    from flywheel.learner.trainer import Trainer

    config = LearnerConfig(policy_model=tiny_llama_path, algorithm="grpo", learning_rate=1e-3, minibatch_size=2)
    model, reference, _tokenizer = load_models(tiny_llama_path, False, False)
    trainer = Trainer(config, model, reference, 0)
    moved = {}
    for thumb, ids in (("up", [11, 12, 13]), ("down", [21, 22, 23])):
        trainer.optimizer.state.clear()  # each thumb on its own: one fresh AdamW step
        with torch.no_grad():  # behaviour logprobs = the current policy's (as the generator would log)
            behaviour = model(build_batch([[1, 5, 6]], [ids], 0), 1.0).logprobs[0].tolist()
        [sample] = rated_samples(with_ids([_logged(thumb, thumb, ids, behaviour)]))
        before = _sequence_logprob(trainer, sample)
        metrics = rating_step(trainer, [sample], policy_version=3)
        moved[thumb] = _sequence_logprob(trainer, sample) - before
        assert metrics["rating_samples"] == 1.0 and metrics["rating_policy_lag_mean"] == 3.0
        assert metrics["rating_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert moved["up"] > 0 > moved["down"]


def test_ratings_used_as_rewards_are_checkpointed_and_never_used_twice(
    redis_client: Any, tiny_reward_path: str
) -> None:
    records = [_logged(f"k{i}", "up" if i % 2 else "down", [7, 8], [-1.0, -2.0]) for i in range(3)]
    ids = store(redis_client, [*records, comparison(9)])
    first = _learning(redis_client, tiny_reward_path, rating_rewards=True)
    assert [r.event_id for r in first.take_rated()] == ids[:3]
    assert first.take_rated() == []  # already used
    state = first.state_dict()
    assert state["rewarded"] == ids[:3]

    # Restart from a checkpoint taken after the update: the pending ratings are re-read, not re-used.
    resumed = _learning(redis_client, tiny_reward_path, rating_rewards=True)
    resumed.load_state_dict(state)
    assert resumed.take_rated() == [] and [r.event_id for r in resumed.buffer] == ids
    # Restart from a checkpoint older than the update: the policy never got them, so they are used again.
    older = _learning(redis_client, tiny_reward_path, rating_rewards=True)
    assert [r.event_id for r in older.take_rated()] == ids[:3]

    fit = resumed.maybe_fit(1, threading.RLock())
    assert fit is not None and fit.event_ids == ids and resumed.rewarded == []  # the window marks them now
    resumed.after_checkpoint(resumed.state_dict())
    assert pending(redis_client) == 0


@pytest.mark.parametrize(("changes", "message"), [
    ({"rating_rewards": True}, "feedback_learning"),
    ({"rating_ratio_clip": 0.0}, "rating_ratio_clip"),
    ({"rm_pointwise_weight": -1.0}, "rm_pointwise_weight"),
    ({"rating_baseline": 2.0}, "rating_baseline"),
    ({"prompt_stream_fraction": 1.5}, "prompt_stream_fraction"),
    ({"prompt_stream": True, "prompt_stream_fraction": 0.5}, "prompts_file"),
])
def test_config_rejects_bad_rating_and_mixing_settings(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LearnerConfig(**changes)
