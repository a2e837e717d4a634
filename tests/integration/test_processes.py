"""Real processes: `flywheel serve` drains on SIGTERM, `flywheel up` leaves nothing behind,
embedded Redis dies with its parent, and the CLI refuses bad input with exit code 2."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from flywheel.common.health import free_port, health_status, wait_serving
from tests.conftest import wait_until

CLI = [sys.executable, "-m", "flywheel.cli"]


def _gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    """PIDs still alive (zombies count as gone) after waiting up to ``timeout`` for them to exit."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update({"FLYWHEEL_DATA_DIR": str(tmp_path / "data"), **extra})
    return env


@pytest.mark.parametrize("service", ["feedback", "reward"])  # the thread-pool server and the asyncio one
def test_serve_drains_and_exits_zero_on_sigterm(service: str, tmp_path: Path, internal_token: str) -> None:
    port = free_port()
    prefix = f"FLYWHEEL_{service.upper()}_"
    env = _env(tmp_path, **{f"{prefix}PORT": str(port), f"{prefix}METRICS_PORT": "0"},
               FLYWHEEL_INTERNAL_TOKEN=internal_token)
    proc = subprocess.Popen([*CLI, "serve", service], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=120, alive=lambda: proc.poll() is None)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "draining" in stderr and "stopped" in stderr
    assert health_status(f"127.0.0.1:{port}") == "UNREACHABLE"


def _start_up(tmp_path: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    data_dir = tmp_path / "cluster"
    proc = subprocess.Popen(
        [*CLI, "up", "--base-port", "0", "--data-dir", str(data_dir), "--timeout", "240"],
        env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # blocks until `up` reports readiness (or exits)
        lines.append(line)
        if "all services healthy" in line:
            break
    else:
        pytest.fail("flywheel up exited before becoming healthy:\n" + "".join(lines))
    state = json.loads((data_dir / "cluster.json").read_text())
    return proc, state


def test_up_starts_four_healthy_services_and_stops_every_child(tmp_path: Path) -> None:
    proc, state = _start_up(tmp_path)
    children = [svc["pid"] for svc in state["services"].values()] + [state["redis_pid"]]
    try:
        assert set(state["services"]) == {"generator", "reward", "feedback", "learner"}
        for svc in state["services"].values():
            assert health_status(svc["address"]) == "SERVING"
        status = subprocess.run([*CLI, "status", "--data-dir", state["data_dir"]], env=_env(tmp_path),
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("SERVING") == 4
        assert all(psutil.pid_exists(pid) for pid in children)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=90)
    assert proc.returncode == 0
    assert _gone(children) == []
    assert not (Path(state["data_dir"]) / "cluster.json").exists()


def test_kill_9_of_up_takes_its_children_down(tmp_path: Path) -> None:
    proc, state = _start_up(tmp_path)
    children = [svc["pid"] for svc in state["services"].values()] + [state["redis_pid"]]
    proc.kill()
    proc.wait(30)
    assert _gone(children, timeout=60) == []


def test_embedded_redis_has_aof_and_dies_with_its_parent(tmp_path: Path) -> None:
    script = (
        "import sys, redis\n"
        "from flywheel.common.redis_store import EmbeddedRedis\n"
        f"r = EmbeddedRedis({str(tmp_path / 'r')!r}).start()\n"
        "c = redis.Redis(unix_socket_path=str(r.socket_path))\n"
        "print(r.process.pid, c.config_get('appendonly')['appendonly'], flush=True)\n"
        "sys.stdin.read()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid, appendonly = parent.stdout.readline().split()
    assert appendonly == "yes"
    assert psutil.pid_exists(int(pid))
    parent.kill()
    parent.wait(30)
    assert _gone([int(pid)]) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "nonsense"], "unknown service 'nonsense'"),
        (["serve", "feedback", "--config", "/nonexistent.yaml"], "does not exist"),
        (["status", "--target", "bogus"], "expected NAME=HOST:PORT"),
    ],
)
def test_cli_rejects_bad_input_with_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    result = subprocess.run([*CLI, *args], env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in " ".join((result.stdout + result.stderr).split())


def test_status_without_a_cluster_exits_1(tmp_path: Path) -> None:
    result = subprocess.run([*CLI, "status", "--data-dir", str(tmp_path)], env=_env(tmp_path),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "no running cluster" in result.stderr


def test_serve_with_bad_env_exits_2(tmp_path: Path) -> None:
    env = _env(tmp_path, FLYWHEEL_FEEDBACK_DURABILITY="sometimes")
    result = subprocess.run([*CLI, "serve", "feedback"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "durability='sometimes'" in result.stderr


def _shows(result: subprocess.CompletedProcess[str], pattern: str) -> bool:
    """The command succeeded and its output matches ``pattern`` (a failed one, which prints
    nothing on stdout, must not pass for a state that merely lacks something)."""
    return result.returncode == 0 and re.search(pattern, result.stdout) is not None


def test_learner_control_commands_drive_the_local_cluster(tmp_path: Path) -> None:
    proc, state = _start_up(tmp_path)
    data_dir = ["--data-dir", state["data_dir"]]

    def learner(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "learner", *args, *data_dir], env=_env(tmp_path), capture_output=True,
                              text=True, timeout=300)

    try:
        assert "step 0, policy v0" in learner("status").stdout
        resumed = learner("resume")
        assert resumed.returncode == 0, resumed.stderr
        # Trains on the built-in prompts and pushes into the generator (a state it reaches on its own).
        wait_until(lambda: _shows(learner("status"), r"policy v[1-9]"), 240, "a first PPO step")
        paused = learner("pause", "--reason", "test")
        assert paused.returncode == 0 and "paus" in paused.stdout
        wait_until(lambda: ", paused" in learner("status").stdout, 240, "the pause after the running step")
        saved = learner("checkpoint")
        assert saved.returncode == 0 and Path(saved.stdout.split(" (")[0].strip()).is_dir()
        status = subprocess.run([*CLI, "status", *data_dir], env=_env(tmp_path), capture_output=True, text=True,
                                timeout=60)
        assert _shows(status, r"policy v[1-9]\d* \("), status  # the generator serves a pushed version
        bad = learner("status", "--learner", "not-an-address")
        assert bad.returncode == 2 and "expected HOST:PORT" in bad.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=90)
    assert proc.returncode == 0
