"""The ingest path writes record JSON and payload hashes from parts (flywheel.feedback.join,
flywheel.feedback.validation); these must stay the text FeedbackRecord.to_json and the canonical
json.dumps write, byte for byte: stored idempotency keys compare against the hashes, and the
learner reads the records."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from flywheel.feedback.join import build_record, record_parts
from flywheel.feedback.records import FeedbackRecord
from flywheel.feedback.validation import EventDraft, InvalidBatch, Limits, parse_batch
from flywheel.v1 import feedback_pb2 as pb

LIMITS = Limits(max_batch_events=100, max_text_chars=10_000, max_metadata_entries=8, max_metadata_bytes=1024)
NOW = 1_700_000_123.456789
AWKWARD = 'Ça va?\n"quoted" \\ \x00 \x1f \x7f / 😀 \u2028 </script>'


def events() -> list[pb.FeedbackEvent]:
    scalar = pb.ScalarScore(value=0.1, min=-1e-7, max=3.5)
    ids = pb.CompletionIdPair(chosen_completion_id="a", rejected_completion_id="b")
    pair = pb.TextPair(prompt=AWKWARD, chosen="Hello! 😀", rejected="Go/away")
    out = [
        pb.FeedbackEvent(idempotency_key="r1", rating=pb.Rating(completion_id="a", thumb=pb.THUMB_UP)),
        pb.FeedbackEvent(
            idempotency_key="r2",
            rating=pb.Rating(completion_id="b", scalar=scalar),
            user_id="ü-1",
            session_id='s"1',
            metadata={"page": 'chat\n"x"', "ключ": "😀", "a": ""},
        ),
        pb.FeedbackEvent(idempotency_key="c1", comparison=pb.Comparison(by_id=ids)),
        pb.FeedbackEvent(idempotency_key="c2", comparison=pb.Comparison(inline=pair), user_id="u"),
        pb.FeedbackEvent(
            idempotency_key="x1", correction=pb.Correction(completion_id="b", corrected_text=AWKWARD)
        ),
        pb.FeedbackEvent(idempotency_key="i1", inline_pair=pb.InlinePair(prompt="2+2?", completion="4")),
        pb.FeedbackEvent(
            idempotency_key="i2",
            inline_pair=pb.InlinePair(prompt=AWKWARD, completion=AWKWARD[::-1], thumb=pb.THUMB_DOWN),
            session_id="ß",
            metadata={"z": "1", "b": "2"},
        ),
        pb.FeedbackEvent(
            idempotency_key="i3",
            inline_pair=pb.InlinePair(
                prompt="p", completion="c", scalar=pb.ScalarScore(value=-2.5e-300, min=-1e300, max=0)
            ),
        ),
    ]
    out[0].client_time.FromNanoseconds(1_700_000_000_123_456_789)
    out[6].client_time.FromSeconds(0)
    return out


def reference_parts(draft: EventDraft, client: str, now: float) -> tuple[str, str]:
    """The (head, tail) record_parts wrote before it was written from parts: via to_json."""
    if not draft.completion_ids:
        return build_record(draft, client, {}, now).to_json(), ""
    text = FeedbackRecord(
        kind=draft.kind,
        idempotency_key=draft.idempotency_key,
        client=client,
        prompt="",
        corrected_text=draft.texts.get("corrected_text"),
        rating=draft.rating,
        user_id=draft.user_id,
        session_id=draft.session_id,
        metadata=draft.metadata,
        client_time=draft.client_time,
        received_at=now,
    ).to_json()
    return text[: text.index(',"prompt":') + 1], text[text.index(',"corrected_text":') :]


def reference_hash(draft: EventDraft) -> str:
    """The canonical payload hash as json.dumps writes it (what stored idempotency keys hold)."""
    body: dict[str, Any] = {
        "kind": draft.kind,
        "completion_ids": draft.completion_ids,
        "prompt": draft.prompt,
        "texts": draft.texts,
        "rating": None if draft.rating is None else vars(draft.rating),
        "user_id": draft.user_id,
        "session_id": draft.session_id,
        "metadata": draft.metadata,
        "client_time": draft.client_time,
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("client", ["tests", 'cl"ient ü'])
def test_record_parts_are_the_to_json_text(client: str) -> None:
    drafts = parse_batch(pb.SubmitFeedbackRequest(events=events()), LIMITS)
    for draft in drafts:
        assert record_parts(draft, client, NOW) == reference_parts(draft, client, NOW), draft.idempotency_key
    assert record_parts(drafts[0], client, 1_700_000_000) == reference_parts(drafts[0], client, 1_700_000_000)


def test_inline_records_parse_back() -> None:
    drafts = parse_batch(pb.SubmitFeedbackRequest(events=events()), LIMITS)
    inline = [d for d in drafts if not d.completion_ids]
    assert [d.kind for d in inline] == ["comparison", "inline_pair", "inline_pair", "inline_pair"]
    for draft in inline:
        head, tail = record_parts(draft, "tests", NOW)
        assert tail == ""
        assert FeedbackRecord.from_json(head) == build_record(draft, "tests", {}, NOW)


def test_payload_hash_is_the_canonical_json_digest() -> None:
    drafts = parse_batch(pb.SubmitFeedbackRequest(events=events()), LIMITS)
    assert [d.payload_hash() for d in drafts] == [reference_hash(d) for d in drafts]
    assert len({d.payload_hash() for d in drafts}) == len(drafts)


def test_payload_hash_is_pinned() -> None:
    """Digests computed by the json.dumps implementation: a change here breaks the idempotency of
    every retry within idempotency_ttl_seconds of a deploy."""
    rated = pb.FeedbackEvent(
        idempotency_key="k1",
        rating=pb.Rating(completion_id="c-1", scalar=pb.ScalarScore(value=0.1, min=-1e-7, max=3.5)),
        user_id="ü-1",
        session_id='s"1',
        metadata={"page": 'chat\n"x"', "ключ": "😀"},
    )
    rated.client_time.FromNanoseconds(1_700_000_000_123_456_789)
    inline = pb.FeedbackEvent(
        idempotency_key="k2", inline_pair=pb.InlinePair(prompt="2+2?", completion="4", thumb=pb.THUMB_UP)
    )
    drafts = parse_batch(pb.SubmitFeedbackRequest(events=[rated, inline]), LIMITS)
    assert [d.payload_hash() for d in drafts] == [
        "cf0960d4814a7392e74c0eded333bc93a76382e89059937f8500becadbceec0b",
        "519120d9700d2f91b182be2639912a2d56d45a529bfad26e3613634b6ebc8619",
    ]


@pytest.mark.parametrize("bad", ["a b", "a\tb", "a\u00a0b", "a\u2028b", "a\u3000b", "a\x7fb", "a\u200bb", ""])
def test_identifiers_refuse_whitespace_and_unprintable_characters(bad: str) -> None:
    event = pb.FeedbackEvent(idempotency_key=bad, inline_pair=pb.InlinePair(prompt="p", completion="c"))
    with pytest.raises(InvalidBatch, match=r"events\[0\]\.idempotency_key"):
        parse_batch(pb.SubmitFeedbackRequest(events=[event]), LIMITS)


def test_identifiers_accept_printable_unicode() -> None:
    event = pb.FeedbackEvent(
        idempotency_key="ключ-😀-ß/1", inline_pair=pb.InlinePair(prompt="p", completion="c"), user_id="ü"
    )
    (draft,) = parse_batch(pb.SubmitFeedbackRequest(events=[event]), LIMITS)
    assert (draft.idempotency_key, draft.user_id) == ("ключ-😀-ß/1", "ü")
