"""SDK pieces without a server: event builders, retry decisions, the spool."""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import pytest

from flywheel_client import ClientConfig, FlywheelError, RetryPolicy, events
from flywheel_client.retry import backoff_s, next_wait_s
from flywheel_client.spool import Spool


class FakeRpcError(grpc.RpcError):
    """A stand-in for the RpcError grpc raises (code, details, trailing metadata)."""

    def __init__(self, code: grpc.StatusCode, trailing: tuple[tuple[str, str], ...] = ()) -> None:
        self._code, self._trailing = code, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "details"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


def test_builders_make_valid_events() -> None:
    r = events.rating("c", score=4, score_range=(1, 5), user_id="u", metadata={"a": "b"})
    assert r.rating.scalar.value == 4 and r.rating.scalar.max == 5 and r.user_id == "u"
    assert r.client_time.seconds > 0 and len(r.idempotency_key) == 32
    assert events.comparison("a", "b").comparison.by_id.rejected_completion_id == "b"
    assert events.comparison("x", "y", prompt="p").comparison.inline.prompt == "p"
    assert events.interaction("p", "c", thumb=False).inline_pair.thumb == 2
    assert events.correction("c", "better", idempotency_key="mine").idempotency_key == "mine"
    with pytest.raises(ValueError):
        events.rating("c")
    with pytest.raises(ValueError):
        events.rating("c", thumb="sideways")


def test_retry_decisions() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.1, max_backoff_s=1.0, jitter=0.0)
    assert next_wait_s(policy, FakeRpcError(grpc.StatusCode.UNAVAILABLE), 1) == pytest.approx(0.1)
    assert next_wait_s(policy, FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED), 2) == pytest.approx(0.2)
    with pytest.raises(FlywheelError, match="after 3 attempts"):
        next_wait_s(policy, FakeRpcError(grpc.StatusCode.UNAVAILABLE), 3)
    with pytest.raises(FlywheelError) as info:
        next_wait_s(policy, FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT), 1)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    limited = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "250"),))
    assert next_wait_s(policy, limited, 1) == pytest.approx(0.25)
    too_long = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "999999"),))
    with pytest.raises(FlywheelError) as info:
        next_wait_s(policy, too_long, 1)
    assert info.value.retry_after_s == pytest.approx(999.999)
    jittery = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=1.0, jitter=0.5)
    waits = [backoff_s(jittery, 1, random.Random(i)) for i in range(50)]
    assert all(0.5 <= w <= 1.5 for w in waits) and len(set(waits)) > 1


def test_spool_survives_reopen_and_keeps_one_copy_per_key(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.db")
    spool = Spool(path)
    a, b = events.interaction("p", "a"), events.interaction("p", "b")
    spool.put([a, b])
    spool.put([a])
    spool.close()
    reopened = Spool(path)
    assert [e.idempotency_key for e in reopened.peek(10)] == [a.idempotency_key, b.idempotency_key]
    reopened.remove([a.idempotency_key])
    reopened.reject(b, "INVALID_ARGUMENT: bad")
    assert len(reopened) == 0 and reopened.rejected() == [(b.idempotency_key, "INVALID_ARGUMENT: bad")]
    reopened.close()


def test_config_reads_api_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_API_KEY", "from-env")
    assert ClientConfig().metadata() == (("authorization", "Bearer from-env"),)
    assert ClientConfig(api_key="arg").metadata() == (("authorization", "Bearer arg"),)
    with pytest.raises(ValueError):
        ClientConfig(timeout_s=0)
