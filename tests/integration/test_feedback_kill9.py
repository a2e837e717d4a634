"""kill -9 of the feedback service (a real `flywheel serve feedback` process) while the SDK streams
events with retries; after a restart every acknowledged event is in the stream exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from flywheel.common.health import free_port, wait_serving
from flywheel_client import AckStatus, ClientConfig, FlywheelClient, RetryPolicy
from tests.unit.feedback.completion_log import stream_records

TOTAL = 300
KILL_AFTER = 60


def start_feedback(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flywheel.cli", "serve", "feedback"], env=env, stdout=out, stderr=out
        )
    wait_serving(f"127.0.0.1:{port}", timeout=120, alive=lambda: proc.poll() is None)
    return proc


@pytest.mark.slow
def test_kill9_loses_no_acknowledged_event(
    redis_url: str, redis_client: Any, api_key: str, api_keys_file: str, internal_token: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "FLYWHEEL_FEEDBACK_PORT": str(port),
        "FLYWHEEL_FEEDBACK_METRICS_PORT": "-1",
        "FLYWHEEL_REDIS_URL": redis_url,
        "FLYWHEEL_API_KEYS_FILE": api_keys_file,
        "FLYWHEEL_INTERNAL_TOKEN": internal_token,
        "FLYWHEEL_DATA_DIR": str(tmp_path / "data"),
    }
    log = tmp_path / "feedback.log"
    proc = start_feedback(port, env, log)
    reached = threading.Event()
    acked: list[str] = []
    errors: list[BaseException] = []
    cfg = ClientConfig(
        feedback_address=f"127.0.0.1:{port}",
        api_key=api_key,
        timeout_s=5.0,
        retry=RetryPolicy(max_attempts=400, initial_backoff_s=0.02, max_backoff_s=0.3),
    )

    def stream_events() -> None:
        try:
            with FlywheelClient(cfg) as fw:
                for i in range(TOTAL):
                    ack = fw.log_interaction("prompt", f"completion {i}", thumb=i % 2 == 0)
                    assert ack.status in (AckStatus.ACCEPTED, AckStatus.DUPLICATE), ack
                    acked.append(ack.idempotency_key)
                    if len(acked) == KILL_AFTER:
                        reached.set()
        except BaseException as exc:
            errors.append(exc)
            reached.set()

    sender = threading.Thread(target=stream_events)
    sender.start()
    try:
        assert reached.wait(timeout=120)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        at_kill = len(acked)
        proc = start_feedback(port, env, log)
        sender.join(timeout=240)
        assert not sender.is_alive()
        assert not errors, errors
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    stored = Counter(r.idempotency_key for r in stream_records(redis_client))
    assert len(acked) == TOTAL and at_kill < TOTAL  # the kill landed mid-stream
    assert all(stored[key] == 1 for key in acked)
    assert max(stored.values()) == 1 and len(stored) == TOTAL
