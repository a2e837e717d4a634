"""FeedbackService over real gRPC and a real Redis: every kind is joined and stored; idempotency,
auth, rate limits and validation (nothing stored on a bad batch); stats."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from flywheel.common import keys
from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.server import build_server
from flywheel.v1 import feedback_pb2, feedback_pb2_grpc
from tests.conftest import auth
from tests.unit.feedback.completion_log import log_completion, stream_records

pb = feedback_pb2


@pytest.fixture
def feedback(start_server: Callable[..., Any], server_config: dict[str, Any], redis_client: Any):
    def start(**changes: Any) -> tuple[feedback_pb2_grpc.FeedbackServiceStub, Any]:
        server = start_server(build_server, FeedbackConfig(**{**server_config, **changes}))
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        channels.append(channel)
        return feedback_pb2_grpc.FeedbackServiceStub(channel), server

    channels: list[grpc.Channel] = []
    yield start
    for channel in channels:
        channel.close()


def submit(stub: Any, api_key: str, *events: pb.FeedbackEvent) -> pb.SubmitFeedbackResponse:
    return stub.SubmitFeedback(pb.SubmitFeedbackRequest(events=events), metadata=auth(api_key), timeout=10)


def test_every_kind_is_joined_and_stored(feedback, redis_client, api_key) -> None:
    stub, _ = feedback()
    cid = log_completion(redis_client, "How was the film?", "It was fine.")
    other = log_completion(redis_client, "How was the film?", "It was awful.")
    events = [
        pb.FeedbackEvent(idempotency_key="r1", rating=pb.Rating(completion_id=cid, thumb=pb.THUMB_UP)),
        pb.FeedbackEvent(
            idempotency_key="r2",
            rating=pb.Rating(completion_id=cid, scalar=pb.ScalarScore(value=2, min=1, max=5)),
            user_id="alice",
            metadata={"page": "chat"},
        ),
        pb.FeedbackEvent(
            idempotency_key="c1",
            comparison=pb.Comparison(
                by_id=pb.CompletionIdPair(chosen_completion_id=cid, rejected_completion_id=other)
            ),
        ),
        pb.FeedbackEvent(
            idempotency_key="c2",
            comparison=pb.Comparison(inline=pb.TextPair(prompt="Hi", chosen="Hello!", rejected="Go away")),
        ),
        pb.FeedbackEvent(
            idempotency_key="x1",
            correction=pb.Correction(completion_id=other, corrected_text="It was superb."),
        ),
        pb.FeedbackEvent(
            idempotency_key="i1",
            inline_pair=pb.InlinePair(prompt="2+2?", completion="4", thumb=pb.THUMB_UP),
        ),
    ]
    events[0].client_time.FromSeconds(1_700_000_000)
    reply = submit(stub, api_key, *events)
    assert [r.status for r in reply.results] == [pb.EVENT_STATUS_ACCEPTED] * 6
    records = {r.idempotency_key: r for r in stream_records(redis_client)}
    assert [r.event_id for r in reply.results] == [records[e.idempotency_key].event_id for e in events]
    rating = records["r1"]
    assert (rating.kind, rating.prompt, rating.client) == ("rating", "How was the film?", "tests")
    assert rating.completion is not None and rating.completion.completion_id == cid
    assert rating.completion.token_ids == [11, 12, 13]
    assert rating.completion.behaviour_logprobs == [-0.5, -1.25, -0.125]
    assert rating.completion.policy_version == 3 and rating.prompt_token_ids == [5, 6, 7]
    assert rating.rating is not None and rating.rating.label is True and rating.client_time == 1_700_000_000
    scalar = records["r2"]
    assert scalar.rating is not None and scalar.rating.score == 0.25 and scalar.rating.label is False
    assert (scalar.user_id, scalar.metadata) == ("alice", {"page": "chat"})
    by_id = records["c1"]
    assert by_id.chosen is not None and by_id.rejected is not None
    assert (by_id.chosen.text, by_id.rejected.text) == ("It was fine.", "It was awful.")
    assert by_id.preference_pair() == {
        "prompt": "How was the film?",
        "chosen": "It was fine.",
        "rejected": "It was awful.",
    }
    assert records["c2"].preference_pair() == {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away"}
    fix = records["x1"]
    assert fix.sft_example() == {"prompt": "How was the film?", "completion": "It was superb."}
    assert fix.preference_pair() == {
        "prompt": "How was the film?",
        "chosen": "It was superb.",
        "rejected": "It was awful.",
    }
    assert records["i1"].kto_example() == {"prompt": "2+2?", "completion": "4", "label": True}
    stats = stub.GetFeedbackStats(pb.GetFeedbackStatsRequest(), metadata=auth(api_key), timeout=10)
    assert dict(stats.accepted_by_kind) == {"rating": 2, "comparison": 2, "correction": 1, "inline_pair": 1}
    assert stats.stream_length == 6 and stats.consumer_lag == 6 and stats.dead_letter_length == 0
    assert stats.oldest_unconsumed_age_seconds >= 0


def test_unknown_completion_is_reported_per_event_and_others_stored(feedback, redis_client, api_key) -> None:
    stub, _ = feedback()
    cid = log_completion(redis_client)
    reply = submit(
        stub,
        api_key,
        pb.FeedbackEvent(idempotency_key="a", rating=pb.Rating(completion_id="nope", thumb=pb.THUMB_UP)),
        pb.FeedbackEvent(idempotency_key="b", rating=pb.Rating(completion_id=cid, thumb=pb.THUMB_DOWN)),
    )
    assert [r.status for r in reply.results] == [pb.EVENT_STATUS_UNKNOWN_COMPLETION, pb.EVENT_STATUS_ACCEPTED]
    assert "'nope'" in reply.results[0].message and reply.results[0].event_id == ""
    assert [r.idempotency_key for r in stream_records(redis_client)] == ["b"]


def test_same_key_same_payload_returns_original_ack(feedback, redis_client, api_key) -> None:
    stub, _ = feedback()
    event = pb.FeedbackEvent(idempotency_key="k", inline_pair=pb.InlinePair(prompt="p", completion="c"))
    first = submit(stub, api_key, event).results[0]
    again = submit(stub, api_key, event).results[0]
    assert first.status == pb.EVENT_STATUS_ACCEPTED
    assert (again.status, again.event_id) == (pb.EVENT_STATUS_DUPLICATE, first.event_id)
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 1


def test_same_key_different_payload_is_already_exists(feedback, redis_client, api_key) -> None:
    stub, _ = feedback()
    submit(
        stub,
        api_key,
        pb.FeedbackEvent(idempotency_key="k", inline_pair=pb.InlinePair(prompt="p", completion="c")),
    )
    fresh = pb.FeedbackEvent(idempotency_key="new", inline_pair=pb.InlinePair(prompt="p", completion="x"))
    changed = pb.FeedbackEvent(idempotency_key="k", inline_pair=pb.InlinePair(prompt="p", completion="d"))
    with pytest.raises(grpc.RpcError) as info:
        submit(stub, api_key, fresh, changed)
    assert info.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert "events[1].idempotency_key" in info.value.details() and "different" in info.value.details()
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 1  # the fresh event was not stored either


def test_concurrent_submissions_of_one_key_store_one_event(
    feedback, redis_client, api_key, server_config
) -> None:
    stub_a, _ = feedback()
    stub_b, _ = feedback()  # a second replica on the same Redis
    cid = log_completion(redis_client)
    event = pb.FeedbackEvent(idempotency_key="once", rating=pb.Rating(completion_id=cid, thumb=pb.THUMB_UP))
    barrier = threading.Barrier(100)
    results: list[pb.EventResult] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        barrier.wait()
        result = submit(stub_a if i % 2 else stub_b, api_key, event).results[0]
        with lock:
            results.append(result)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 1
    statuses = [r.status for r in results]
    assert statuses.count(pb.EVENT_STATUS_ACCEPTED) == 1 and statuses.count(pb.EVENT_STATUS_DUPLICATE) == 99
    assert len({r.event_id for r in results}) == 1


def test_unauthenticated(feedback, redis_client) -> None:
    stub, _ = feedback()
    event = pb.FeedbackEvent(idempotency_key="k", inline_pair=pb.InlinePair(prompt="p", completion="c"))
    for metadata in ((), auth("wrong-key")):
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitFeedback(pb.SubmitFeedbackRequest(events=[event]), metadata=metadata, timeout=10)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 0


def test_rate_limit_is_resource_exhausted_with_retry_after(feedback, redis_client, api_key) -> None:
    stub, _ = feedback(rate_limit_per_second=1.0, rate_limit_burst=3, max_batch_events=3)
    events = [
        pb.FeedbackEvent(idempotency_key=f"k{i}", inline_pair=pb.InlinePair(prompt="p", completion=f"c{i}"))
        for i in range(4)
    ]
    assert len(submit(stub, api_key, *events[:3]).results) == 3
    with pytest.raises(grpc.RpcError) as info:
        submit(stub, api_key, events[3])
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(info.value.trailing_metadata())
    assert 0 < int(trailing["retry-after-ms"]) <= 1000
    assert "retry after" in info.value.details()
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 3


BAD_EVENTS = [
    (pb.FeedbackEvent(idempotency_key="k"), "events[1].kind"),
    (pb.FeedbackEvent(inline_pair=pb.InlinePair(prompt="p", completion="c")), "events[1].idempotency_key"),
    (pb.FeedbackEvent(idempotency_key="k", rating=pb.Rating(completion_id="c")), "events[1].rating.value"),
    (
        pb.FeedbackEvent(
            idempotency_key="k",
            rating=pb.Rating(completion_id="c", scalar=pb.ScalarScore(value=9, min=1, max=5)),
        ),
        "events[1].rating.scalar.value",
    ),
    (
        pb.FeedbackEvent(idempotency_key="k", inline_pair=pb.InlinePair(prompt="p", completion="x" * 101)),
        "limit is 100",
    ),
    (
        pb.FeedbackEvent(
            idempotency_key="k",
            inline_pair=pb.InlinePair(prompt="p", completion="c"),
            metadata={"a": "b" * 300},
        ),
        "events[1].metadata",
    ),
    (
        pb.FeedbackEvent(idempotency_key="k", correction=pb.Correction(completion_id="c")),
        "events[1].correction.corrected_text",
    ),
    (pb.FeedbackEvent(idempotency_key="k", comparison=pb.Comparison()), "events[1].comparison.pair"),
]


@pytest.mark.parametrize(("bad", "where"), BAD_EVENTS)
def test_malformed_event_rejects_whole_batch(feedback, redis_client, api_key, bad, where) -> None:
    stub, _ = feedback(max_text_chars=100, max_metadata_bytes=256)
    good = pb.FeedbackEvent(idempotency_key="good", inline_pair=pb.InlinePair(prompt="p", completion="c"))
    with pytest.raises(grpc.RpcError) as info:
        submit(stub, api_key, good, bad)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert where in info.value.details()
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 0
    assert redis_client.keys(keys.idempotency_key("*")) == []


def test_batch_size_limit_and_join_level_errors(feedback, redis_client, api_key) -> None:
    stub, _ = feedback(max_batch_events=2, rate_limit_burst=10)
    event = pb.FeedbackEvent(idempotency_key="k", inline_pair=pb.InlinePair(prompt="p", completion="c"))
    with pytest.raises(grpc.RpcError) as info:
        submit(stub, api_key, *[event] * 3)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "limit is 2" in info.value.details()
    a = log_completion(redis_client, prompt="one")
    b = log_completion(redis_client, prompt="two")
    mixed = pb.FeedbackEvent(
        idempotency_key="m",
        comparison=pb.Comparison(by_id=pb.CompletionIdPair(chosen_completion_id=a, rejected_completion_id=b)),
    )
    with pytest.raises(grpc.RpcError) as info:
        submit(stub, api_key, mixed)
    assert (
        info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "different prompts" in info.value.details()
    )
    with pytest.raises(grpc.RpcError) as info:
        submit(stub, api_key)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 0


def test_metrics_are_exported(feedback, redis_client, api_key) -> None:
    import urllib.request

    stub, server = feedback()
    submit(
        stub,
        api_key,
        pb.FeedbackEvent(idempotency_key="k", inline_pair=pb.InlinePair(prompt="p", completion="c")),
    )
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    )
    assert 'flywheel_feedback_events_accepted_total{kind="inline_pair"} 1.0' in body
    assert "flywheel_feedback_stream_lag_events 1.0" in body
    assert "flywheel_feedback_ack_latency_seconds_count 1.0" in body
    assert "flywheel_feedback_batch_size_events_count 1.0" in body
