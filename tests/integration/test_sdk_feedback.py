"""The SDK against a real feedback server and Redis: every call, batching, retries on rate limits,
the spool across an outage, auth errors, and the async client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from flywheel.common import keys
from flywheel.common.health import free_port
from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.server import build_server
from flywheel_client import (
    AckStatus,
    AsyncFlywheelClient,
    ClientConfig,
    FlywheelClient,
    FlywheelError,
    RetryPolicy,
    events,
)
from tests.unit.feedback.completion_log import log_completion, stream_records

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture
def server(start_server: Any, server_config: dict[str, Any], redis_client: Any) -> Any:
    return start_server(build_server, FeedbackConfig(**server_config))


def config(server: Any, api_key: str, **kw: Any) -> ClientConfig:
    kw.setdefault("retry", FAST_RETRY)
    return ClientConfig(feedback_address=f"127.0.0.1:{server.port}", api_key=api_key, **kw)


def test_every_call_round_trips(server: Any, redis_client: Any, api_key: str) -> None:
    a = log_completion(redis_client, "Q", "first")
    b = log_completion(redis_client, "Q", "second")
    with FlywheelClient(config(server, api_key)) as fw:
        acks = [
            fw.rate(a, thumb="up", user_id="u1"),
            fw.rate(b, score=2.0, score_range=(0, 10)),
            fw.compare(a, b),
            fw.compare("yes", "no", prompt="Q2"),
            fw.correct(b, "third"),
            fw.log_interaction("P", "C", thumb="down", session_id="s"),
        ]
        assert [x.status for x in acks] == [AckStatus.ACCEPTED] * 6 and all(x.stored for x in acks)
        missing = fw.rate("no-such-completion", thumb="up")
        assert missing.status is AckStatus.UNKNOWN_COMPLETION and "unknown" in missing.message
        result = fw.submit([events.interaction("p", str(i)) for i in range(1200)])  # split into 3 calls
        assert result.all_stored and len(result.acks) == 1200
        stats = fw.stats()
    assert stats.accepted_by_kind == {"rating": 2, "comparison": 2, "correction": 1, "inline_pair": 1201}
    records = stream_records(redis_client)
    assert [r.event_id for r in records[:6]] == [x.event_id for x in acks]
    assert records[0].completion is not None and records[0].completion.completion_id == a
    assert records[1].rating is not None and records[1].rating.score == pytest.approx(0.2)


def test_retry_reuses_idempotency_key(server: Any, redis_client: Any, api_key: str) -> None:
    event = events.interaction("p", "c")
    with FlywheelClient(config(server, api_key)) as fw:
        first = fw.submit([event]).acks[0]
        again = fw.submit([event]).acks[0]  # what a retry after a lost reply looks like
        assert (again.status, again.event_id) == (AckStatus.DUPLICATE, first.event_id)
        changed = events.interaction("p", "other", idempotency_key=event.idempotency_key)
        with pytest.raises(FlywheelError) as info:
            fw.submit([changed])
        assert info.value.code is grpc.StatusCode.ALREADY_EXISTS
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 1


def test_unauthenticated_is_not_retried(server: Any, redis_client: Any) -> None:
    with FlywheelClient(config(server, "wrong")) as fw, pytest.raises(FlywheelError) as info:
        fw.log_interaction("p", "c")
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED


def test_rate_limited_calls_wait_for_retry_after(
    start_server: Any, server_config: dict[str, Any], redis_client: Any, api_key: str
) -> None:
    server = start_server(
        build_server,
        FeedbackConfig(**server_config, rate_limit_per_second=20.0, rate_limit_burst=2, max_batch_events=2),
    )
    retry = RetryPolicy(max_attempts=20, initial_backoff_s=0.01, max_backoff_s=0.05)
    with FlywheelClient(config(server, api_key, retry=retry)) as fw:
        acks = [fw.log_interaction("p", str(i)) for i in range(6)]
    assert all(a.status is AckStatus.ACCEPTED for a in acks)
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 6


def test_background_batching_and_flush(server: Any, redis_client: Any, api_key: str) -> None:
    with FlywheelClient(config(server, api_key, batching=True, max_batch_events=64)) as fw:
        queued = [fw.log_interaction("p", str(i)) for i in range(300)]
        assert {q.status for q in queued} == {AckStatus.QUEUED}
        acks = fw.flush()
        assert sorted(a.idempotency_key for a in acks) == sorted(q.idempotency_key for q in queued)
        assert all(a.status is AckStatus.ACCEPTED for a in acks)
        fw.log_interaction("p", "last")  # sent by close()
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 301


def test_spool_delivers_once_after_outage(
    start_server: Any, server_config: dict[str, Any], redis_client: Any, api_key: str, tmp_path: Path
) -> None:
    port = free_port()
    cfg = ClientConfig(
        feedback_address=f"127.0.0.1:{port}",
        api_key=api_key,
        retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02),
        timeout_s=2.0,
        spool_path=str(tmp_path / "spool.db"),
    )
    fw = FlywheelClient(cfg)
    sent = [fw.log_interaction("p", str(i)) for i in range(5)]
    sent += fw.submit([events.interaction("p", str(i)) for i in range(5, 8)]).acks
    assert {a.status for a in sent} == {AckStatus.SPOOLED}
    fw.close()  # the app restarts; the spool is on disk
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 0
    start_server(build_server, FeedbackConfig(**{**server_config, "port": port}))
    with FlywheelClient(cfg) as again:
        assert len(again.spool or []) == 8
        again.flush()
        assert len(again.spool or []) == 0
        again.flush()
    keys_stored = [r.idempotency_key for r in stream_records(redis_client)]
    assert sorted(keys_stored) == sorted(a.idempotency_key for a in sent)


async def test_async_client(server: Any, redis_client: Any, api_key: str) -> None:
    cid = log_completion(redis_client)
    async with AsyncFlywheelClient(config(server, api_key)) as fw:
        ack = await fw.rate(cid, thumb="down")
        assert ack.status is AckStatus.ACCEPTED
        assert (await fw.correct(cid, "much better")).stored
        assert (await fw.stats()).accepted_by_kind["rating"] == 1
    async with AsyncFlywheelClient(config(server, api_key, batching=True)) as fw:
        queued = [await fw.log_interaction("p", str(i)) for i in range(50)]
        acks = await fw.flush()
        assert len(acks) == 50 and {q.status for q in queued} == {AckStatus.QUEUED}
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 52
