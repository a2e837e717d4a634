"""FeedbackConsumer on a real Redis: read/ack, reclaim of stale entries, dead-lettering; stats lag."""

from __future__ import annotations

from typing import Any

from flywheel.common import keys
from flywheel.feedback.consumer import FeedbackConsumer
from flywheel.feedback.core import FeedbackStore, StoreItem
from flywheel.feedback.records import CompletionRecord, FeedbackRecord, RatingValue


def add_records(redis_client: Any, n: int) -> list[str]:
    store = FeedbackStore(redis_client)
    items = []
    for i in range(n):
        record = FeedbackRecord(
            kind="inline_pair",
            idempotency_key=f"k{i}",
            client="tests",
            prompt=f"p{i}",
            completion=CompletionRecord(text=f"c{i}"),
            rating=RatingValue(thumb="up"),
        )
        items.append(StoreItem(keys.idempotency_key(f"tests:k{i}"), f"h{i}", "inline_pair", record.to_json()))
    return [o.event_id for o in store.store(items)]


def test_read_ack_and_resume(redis_client: Any) -> None:
    ids = add_records(redis_client, 5)
    consumer = FeedbackConsumer(redis_client, consumer_name="a")
    first = consumer.read(count=3)
    assert [r.event_id for r in first] == ids[:3]
    assert first[0].prompt == "p0" and first[0].kto_example() == {
        "prompt": "p0",
        "completion": "c0",
        "label": True,
    }
    assert consumer.ack([r.event_id for r in first]) == 3
    again = FeedbackConsumer(redis_client, consumer_name="b")  # a restarted learner: same group position
    assert [r.event_id for r in again.read(count=10)] == ids[3:]
    assert again.read(count=10, block_ms=None) == []
    stats = FeedbackStore(redis_client).stats()
    assert (stats.consumer_lag, stats.pending, stats.stream_length) == (0, 2, 5)
    assert stats.oldest_unconsumed_age_seconds >= 0


def test_reclaim_takes_over_stale_entries_and_dead_letters_poison(redis_client: Any) -> None:
    ids = add_records(redis_client, 2)
    crashed = FeedbackConsumer(redis_client, consumer_name="crashed", min_idle_ms=0, max_deliveries=2)
    assert len(crashed.read(count=2)) == 2  # delivery 1, never acked
    rescuer = FeedbackConsumer(redis_client, consumer_name="rescuer", min_idle_ms=0, max_deliveries=2)
    reclaimed = rescuer.reclaim()  # delivery 2
    assert [r.event_id for r in reclaimed] == ids
    rescuer.ack([ids[0]])
    assert rescuer.reclaim() == []  # delivery 3 of ids[1] > max_deliveries: dead-lettered
    dead = redis_client.xrange(keys.FEEDBACK_DEAD_LETTER)
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"source_id"].decode() == ids[1] and fields[b"deliveries"] == b"3"
    assert FeedbackRecord.from_json(fields[b"record"]).idempotency_key == "k1"
    assert rescuer.pending().count == 0
    assert FeedbackStore(redis_client).stats().dead_letter_length == 1


def test_reclaim_respects_min_idle(redis_client: Any) -> None:
    add_records(redis_client, 1)
    FeedbackConsumer(redis_client, consumer_name="busy").read(count=1)
    patient = FeedbackConsumer(redis_client, consumer_name="other", min_idle_ms=3_600_000)
    assert patient.reclaim() == []
    assert patient.pending().consumers == {"busy": 1}


def test_invalid_entries_are_dead_lettered_on_read(redis_client: Any) -> None:
    add_records(redis_client, 1)
    redis_client.xadd(keys.FEEDBACK_STREAM, {"kind": "rating", "record": "{not json"})
    consumer = FeedbackConsumer(redis_client, consumer_name="a")
    assert [r.idempotency_key for r in consumer.read(count=10)] == ["k0"]
    assert redis_client.xlen(keys.FEEDBACK_DEAD_LETTER) == 1
    assert consumer.pending().count == 1  # only the valid one awaits its ack


def test_learner_can_dead_letter_a_record(redis_client: Any) -> None:
    ids = add_records(redis_client, 1)
    consumer = FeedbackConsumer(redis_client, consumer_name="a")
    consumer.read()
    consumer.dead_letter(ids[0], "tokenizer rejected it")
    entry = redis_client.xrange(keys.FEEDBACK_DEAD_LETTER)[0][1]
    assert entry[b"reason"] == b"tokenizer rejected it" and entry[b"kind"] == b"inline_pair"
    assert consumer.pending().count == 0
