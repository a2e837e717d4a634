"""Feedback learning pieces on a real Redis and the tiny reward model: records -> pairs, the temporal
held-out split, config validation, and the ack bookkeeping across a simulated crash (before and after
the checkpoint)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from flywheel.common import keys
from flywheel.common.config import ConfigError
from flywheel.common.health import free_port
from flywheel.feedback.core import FeedbackStore, StoreItem
from flywheel.feedback.records import CompletionRecord, FeedbackRecord, RatingValue
from flywheel.learner.config import LearnerConfig
from flywheel.learner.feedback_learning import FeedbackLearning, records_to_pairs, split_newest
from flywheel.learner.metrics import LearnerMetrics


def comparison(i: int, chosen: str = "the movie was great!", rejected: str = "the movie was awful.") -> FeedbackRecord:
    return FeedbackRecord(kind="comparison", idempotency_key=f"c{i}", client="tests", prompt=f"How was it {i}?",
                          chosen=CompletionRecord(chosen), rejected=CompletionRecord(rejected))


def rating(key: str, prompt: str, text: str, thumb: str) -> FeedbackRecord:
    return FeedbackRecord(kind="rating", idempotency_key=key, client="tests", prompt=prompt,
                          completion=CompletionRecord(text, completion_id=key), rating=RatingValue(thumb=thumb))


def store(redis_client: Any, records: list[FeedbackRecord]) -> list[str]:
    items = [StoreItem(keys.idempotency_key(f"tests:{r.idempotency_key}"), r.idempotency_key, r.kind, r.to_json())
             for r in records]
    return [o.event_id for o in FeedbackStore(redis_client).store(items)]


def test_records_become_pairs_in_stream_order() -> None:
    records = [
        rating("r1", "Q", "fine", "up"),
        FeedbackRecord(kind="correction", idempotency_key="x", client="t", prompt="P",
                       completion=CompletionRecord("bad answer", completion_id="a"), corrected_text="good answer"),
        rating("r2", "Q", "rude", "down"),
        rating("lone", "Other", "meh", "up"),  # a lone rating gives no pair
        comparison(1),
    ]
    for i, r in enumerate(records):
        object.__setattr__(r, "event_id", f"{i + 1}-0")
    pairs = records_to_pairs(records)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("P", "good answer", "bad answer"), ("Q", "fine", "rude"), ("How was it 1?", "the movie was great!",
                                                                    "the movie was awful.")]
    assert pairs[1]["event_ids"] == ["1-0", "3-0"] and pairs[1]["margin"] == 1.0


def test_split_holds_out_the_newest() -> None:
    pairs = [{"i": i} for i in range(10)]
    train, held = split_newest(pairs, 0.2)
    assert [p["i"] for p in held] == [8, 9] and len(train) == 8
    assert split_newest(pairs, 0.0) == (pairs, [])
    assert split_newest(pairs[:1], 0.5) == (pairs[:1], [])


@pytest.mark.parametrize(("changes", "message"), [
    ({"rm_holdout_fraction": 1.0}, "rm_holdout_fraction"),
    ({"rm_min_new_events": 0}, "rm_min_new_events"),
    ({"feedback_batch": 4, "rm_min_new_events": 8}, "feedback_batch"),
    ({"feedback_learning": True, "reward_model": ""}, "reward_model"),
])
def test_config_rejects_bad_feedback_settings(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LearnerConfig(**changes)


def _learning(redis_client: Any, tiny_reward_path: str, **changes: Any) -> FeedbackLearning:
    base: dict[str, Any] = dict(feedback_learning=True, reward_model=tiny_reward_path, rm_fit_every_steps=1,
                                rm_min_new_events=4, feedback_batch=4, rm_max_steps=2, rm_holdout_fraction=0.0,
                                reward_target=f"127.0.0.1:{free_port()}", rpc_timeout=1.0)
    base.update(changes)
    learning = FeedbackLearning(LearnerConfig(**base), LearnerMetrics(CollectorRegistry()), redis_client)
    learning.load()
    return learning


def pending(redis_client: Any) -> int:
    return int(redis_client.xpending(keys.FEEDBACK_STREAM, keys.FEEDBACK_GROUP)["pending"])


def test_ids_stay_pending_until_the_checkpoint_then_resume_skips_or_retrains(
    redis_client: Any, tiny_reward_path: str
) -> None:
    lock = threading.RLock()
    ids = store(redis_client, [comparison(i) for i in range(6)])
    first = _learning(redis_client, tiny_reward_path)
    fit = first.maybe_fit(1, lock)
    assert fit is not None and fit.event_ids == ids[:4] and fit.pushed and fit.rm_version == 1
    assert pending(redis_client) == 4  # read, fitted, not checkpointed: still pending

    # Crash before the checkpoint: a new learner (no state) re-reads its own pending entries.
    retry = _learning(redis_client, tiny_reward_path)
    again = retry.maybe_fit(1, lock)
    assert again is not None and again.event_ids == ids[:4]

    # The checkpoint is written; a crash before XACK: the restarted learner acks and skips them.
    state = retry.state_dict()
    assert state["unacked"] == ids[:4] and state["windows"][-1]["event_ids"] == ids[:4]
    resumed = _learning(redis_client, tiny_reward_path)
    resumed.load_state_dict(state)
    resumed.poll()
    assert [r.event_id for r in resumed.buffer] == ids[4:]
    assert pending(redis_client) == 2  # the checkpointed four were acked on sight
    assert resumed.maybe_fit(1, lock) is None  # two new events < rm_min_new_events

    # Normal path: after_checkpoint acks exactly the ids the checkpoint covers.
    store(redis_client, [comparison(i) for i in range(6, 8)])
    fit = resumed.maybe_fit(1, lock)
    assert fit is not None and fit.event_ids == ids[4:] + fit.event_ids[2:] and fit.rm_version == 2
    snapshot = resumed.state_dict()
    resumed.after_checkpoint(snapshot)
    assert pending(redis_client) == 0 and resumed.unacked == [] and resumed.consumed_total == 4
    windows = [w["event_ids"] for w in snapshot["windows"]]
    assert windows[0] == ids[:4] and len({i for w in windows for i in w}) == sum(len(w) for w in windows)


def test_corrections_fine_tune_the_policy_when_asked(redis_client: Any, tiny_reward_path: str,
                                                     tiny_llama_path: str) -> None:
    import torch

    from flywheel.learner.models import load_models

    model, _reference, tokenizer = load_models(tiny_llama_path, False, False)
    before = {n: p.detach().clone() for n, p in model.policy.named_parameters()}
    store(redis_client, [
        FeedbackRecord(kind="correction", idempotency_key=f"x{i}", client="tests", prompt="How was it?",
                       completion=CompletionRecord("the movie was dull."), corrected_text="the movie was great!")
        for i in range(4)
    ])
    learning = _learning(redis_client, tiny_reward_path, sft_on_corrections=True, learning_rate=1e-3)
    fit = learning.maybe_fit(1, threading.RLock(), model.policy, tokenizer)
    assert fit is not None and fit.sft_examples == 4 and fit.train_pairs == 4
    assert all(not torch.equal(p, before[n]) for n, p in model.policy.named_parameters())
    assert not model.policy.is_activation_checkpointing
