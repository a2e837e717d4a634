"""durability: always against real Redis servers: set appendfsync always where allowed, refuse to
start with a clear error where CONFIG is disabled."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from flywheel.common.redis_store import EmbeddedRedis, _die_with_parent, redis_server_binary
from flywheel.feedback.core import DurabilityError, FeedbackStore, StoreItem


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
