"""The join inside Redis (flywheel.feedback.join_script) against the Python join on a real Redis:
byte-identical records for every kind and awkward logged values, the same rejections, and a
fallback (nothing stored) for logged values only the Python join reproduces; the rate limit the
script checks first."""

from __future__ import annotations

import json
from typing import Any

import pytest

from flywheel.common import keys
from flywheel.feedback.core import (
    FeedbackStore,
    IdempotencyConflict,
    JoinItem,
    JoinRejected,
    RateLimit,
    RateLimited,
)
from flywheel.feedback.join import build_record, record_parts
from flywheel.feedback.validation import EventDraft, Limits, parse_batch
from flywheel.v1 import feedback_pb2 as pb
from tests.unit.feedback.completion_log import log_completion

LIMITS = Limits(max_batch_events=100, max_text_chars=10_000, max_metadata_entries=8, max_metadata_bytes=1024)
NOW = 1_700_000_123.456789
CHAT = [
    {"role": "system", "content": 'Be "brief"\\ \t and kind.\n'},
    {"role": "user", "content": "Ça va? 😀 \x7f \x01 ünïcode , : [ ] { }"},
]


def log_chat(client: Any, completion: str, **fields: str) -> str:
    cid = log_completion(client, 'Ça va?\n"quoted" \\ \x00 \x1f 😀', completion)
    client.hset(keys.completion_key(cid), mapping={"prompt_messages": json.dumps(CHAT), **fields})
    return cid


def items_for(drafts: list[EventDraft], client: str = "tests") -> list[JoinItem]:
    items = []
    for d in drafts:
        head, tail = record_parts(d, client, NOW)
        corrected = d.texts.get("corrected_text", "") if d.kind == "correction" else ""
        key = keys.idempotency_key(f"{client}:{d.idempotency_key}")
        items.append(JoinItem(key, d.payload_hash(), d.kind, head, tail, tuple(d.completion_ids), corrected))
    return items


def python_records(store: FeedbackStore, drafts: list[EventDraft]) -> list[str]:
    logged = store.lookup_completions({cid for d in drafts for cid in d.completion_ids})
    return [build_record(d, "tests", logged, NOW).to_json() for d in drafts]


def every_kind(a: str, b: str) -> list[pb.FeedbackEvent]:
    scalar = pb.ScalarScore(value=0.1, min=-1e-7, max=3.5)
    events = [
        pb.FeedbackEvent(idempotency_key="r1", rating=pb.Rating(completion_id=a, thumb=pb.THUMB_UP)),
        pb.FeedbackEvent(
            idempotency_key="r2",
            rating=pb.Rating(completion_id=b, scalar=scalar),
            user_id="ü-1",
            session_id='s"1',
            metadata={"page": 'chat\n"x"', "ключ": "😀"},
        ),
        pb.FeedbackEvent(
            idempotency_key="c1",
            comparison=pb.Comparison(
                by_id=pb.CompletionIdPair(chosen_completion_id=a, rejected_completion_id=b)
            ),
        ),
        pb.FeedbackEvent(
            idempotency_key="c2",
            comparison=pb.Comparison(inline=pb.TextPair(prompt="Hi", chosen="Hello!", rejected="Go")),
        ),
        pb.FeedbackEvent(
            idempotency_key="x1", correction=pb.Correction(completion_id=b, corrected_text="ok\n")
        ),
        pb.FeedbackEvent(idempotency_key="i1", inline_pair=pb.InlinePair(prompt="2+2?", completion="4")),
    ]
    events[0].client_time.FromNanoseconds(1_700_000_000_123_456_789)
    return events


@pytest.mark.parametrize("chat", [False, True])
def test_lua_join_gives_the_python_join_records_byte_for_byte(redis_client: Any, chat: bool) -> None:
    store = FeedbackStore(redis_client)
    if chat:
        a, b = log_chat(redis_client, "fine 😀"), log_chat(redis_client, 'awful "\\"')
        redis_client.hset(
            keys.completion_key(b), "logprobs", json.dumps([-1e-05, -0.0, -123.456, 0, -2.5e-300])
        )
    else:
        a = log_completion(redis_client, "How was it?", "It was fine.")
        b = log_completion(redis_client, "How was it?", "It was awful.", policy_version=0)
        redis_client.hset(keys.completion_key(a), mapping={"policy_version": "", "created_at": ""})
    drafts = parse_batch(pb.SubmitFeedbackRequest(events=every_kind(a, b)), LIMITS)
    expected = python_records(store, drafts)
    outcomes = store.join_and_store(items_for(drafts))
    assert outcomes is not None and [o.status for o in outcomes] == ["accepted"] * len(drafts)
    stored = {e.decode(): f[b"record"].decode() for e, f in redis_client.xrange(keys.FEEDBACK_STREAM)}
    assert [stored[o.event_id] for o in outcomes] == expected
    counts = redis_client.hgetall("flywheel:feedback:stats")
    assert counts == {b"rating": b"2", b"comparison": b"2", b"correction": b"1", b"inline_pair": b"1"}
    again = store.join_and_store(items_for(drafts))
    assert again is not None and [o.event_id for o in again] == [o.event_id for o in outcomes]
    assert {o.status for o in again} == {"duplicate"}


def test_unknown_completions_are_reported_per_event(redis_client: Any) -> None:
    store = FeedbackStore(redis_client)
    a = log_completion(redis_client)
    events = [
        pb.FeedbackEvent(idempotency_key="k1", rating=pb.Rating(completion_id="gone", thumb=pb.THUMB_UP)),
        pb.FeedbackEvent(
            idempotency_key="k2",
            comparison=pb.Comparison(
                by_id=pb.CompletionIdPair(chosen_completion_id="x", rejected_completion_id=a)
            ),
        ),
        pb.FeedbackEvent(idempotency_key="k3", rating=pb.Rating(completion_id=a, thumb=pb.THUMB_UP)),
    ]
    outcomes = store.join_and_store(items_for(parse_batch(pb.SubmitFeedbackRequest(events=events), LIMITS)))
    assert outcomes is not None
    assert [(o.status, o.missing) for o in outcomes] == [
        ("unknown", ("gone",)),
        ("unknown", ("x",)),
        ("accepted", ()),
    ]
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 1


def test_rejected_join_stores_nothing_and_beats_a_conflict(redis_client: Any) -> None:
    store = FeedbackStore(redis_client)
    a = log_completion(redis_client, "one", "same")
    b = log_completion(redis_client, "two", "other")
    inline = pb.FeedbackEvent(idempotency_key="k", inline_pair=pb.InlinePair(prompt="p", completion="c"))
    assert store.join_and_store(items_for(parse_batch(pb.SubmitFeedbackRequest(events=[inline]), LIMITS)))
    changed = pb.FeedbackEvent(idempotency_key="k", inline_pair=pb.InlinePair(prompt="p", completion="d"))
    bad_pair = pb.FeedbackEvent(
        idempotency_key="p",
        comparison=pb.Comparison(by_id=pb.CompletionIdPair(chosen_completion_id=a, rejected_completion_id=b)),
    )
    same = pb.FeedbackEvent(
        idempotency_key="s", correction=pb.Correction(completion_id=a, corrected_text="same")
    )
    for bad, reason in ((bad_pair, "prompts"), (same, "identical")):
        drafts = parse_batch(pb.SubmitFeedbackRequest(events=[changed, bad]), LIMITS)
        with pytest.raises(JoinRejected) as info:
            store.join_and_store(items_for(drafts))
        assert (info.value.index, info.value.reason) == (1, reason)
    with pytest.raises(IdempotencyConflict) as conflict:
        store.join_and_store(
            items_for(parse_batch(pb.SubmitFeedbackRequest(events=[inline, changed]), LIMITS))
        )
    assert conflict.value.index == 1
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("policy_version", "3.0"),
        ("created_at", "1700000000"),
        ("logprobs", json.dumps([-0.5, float("-inf")])),
        ("prompt_messages", '[{"role": "user", "content": "\\ud800"}]'),
    ],
)
def test_values_only_python_reproduces_fall_back_before_storing(
    redis_client: Any, field: str, value: str
) -> None:
    store = FeedbackStore(redis_client)
    cid = log_completion(redis_client)
    redis_client.hset(keys.completion_key(cid), field, value)
    events = [
        pb.FeedbackEvent(idempotency_key="i", inline_pair=pb.InlinePair(prompt="p", completion="c")),
        pb.FeedbackEvent(idempotency_key="r", rating=pb.Rating(completion_id=cid, thumb=pb.THUMB_UP)),
    ]
    drafts = parse_batch(pb.SubmitFeedbackRequest(events=events), LIMITS)
    assert store.join_and_store(items_for(drafts)) is None
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 0
    assert redis_client.keys(keys.idempotency_key("*")) == []


def test_rate_limit_comes_first_and_a_limited_batch_takes_and_stores_nothing(redis_client: Any) -> None:
    store = FeedbackStore(redis_client)
    cid = log_completion(redis_client)
    limit = RateLimit("tests", per_second=0.001, burst=3)  # refills 1 token per 1000 s: none here

    def batch(*names: str) -> list[JoinItem]:
        events = [
            pb.FeedbackEvent(idempotency_key=name, rating=pb.Rating(completion_id=cid, thumb=pb.THUMB_UP))
            for name in names
        ]
        return items_for(parse_batch(pb.SubmitFeedbackRequest(events=events), LIMITS))

    outcomes = store.join_and_store(batch("a", "b"), limit)
    assert outcomes is not None and [o.status for o in outcomes] == ["accepted", "accepted"]
    with pytest.raises(RateLimited) as info:
        store.join_and_store(batch("c", "d"), limit)  # 2 tokens wanted, 1 left
    assert info.value.wait_ms > 0
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 2
    assert redis_client.get(keys.idempotency_key("tests:c")) is None
    # The limited batch took nothing: the last token still lets one event through.
    last = store.join_and_store(batch("c"), limit)
    assert last is not None and [o.status for o in last] == ["accepted"]
    with pytest.raises(RateLimited):
        store.join_and_store(batch("a"), limit)  # even a duplicate costs a token, as before
    other = store.join_and_store(batch("e"), RateLimit("someone-else", 0.001, 3))  # buckets are per client
    assert other is not None and [o.status for o in other] == ["accepted"]
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 4
