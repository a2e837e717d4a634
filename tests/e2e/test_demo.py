"""`flywheel demo --quick` as a user runs it: a real process that starts the cluster, lets simulated
users teach it a hidden preference, writes the summary and curves, and leaves no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_quick_demo_learns_the_hidden_preference_and_cleans_up(tmp_path: Path) -> None:
    from flywheel.demo.models import demo_policy, demo_reward_model

    demo_policy(), demo_reward_model()  # built once and cached (the first build is the slow part)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "flywheel.cli", "demo", "--quick", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=840, env={**os.environ, "COLUMNS": "200"},
    )
    output = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, output

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] is True and summary["problems"] == []
    assert {"score", "policy_version", "count"} <= set(summary["before"]) & set(summary["after"])
    assert summary["before"]["policy_version"] == 0
    assert summary["after"]["score"] > summary["before"]["score"], output
    assert summary["reward_model"]["versions"] >= 1
    assert summary["policy_versions"] >= 2
    assert summary["feedback"]["stored_by_kind"]["comparison"] > 0
    for name in ("curves.png", "demo.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "preference on 28 fresh prompts" in proc.stdout

    children = json.loads((run_dir / "processes.json").read_text())["children"]
    assert set(children) == {"generator", "reward", "feedback", "learner", "redis"}
    assert [name for name, pid in children.items() if _alive(pid)] == []
