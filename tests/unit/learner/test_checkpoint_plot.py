"""Checkpoint atomicity and pruning; the plot command on a metrics log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.learner import checkpoint as ckpt


class _Saveable:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_pretrained(self, path: Path, **_: object) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self.fail:
            raise OSError("disk full")
        (path / "model.safetensors").write_bytes(b"")


def test_checkpoints_are_complete_or_absent_and_pruned(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, {"policy_version": step}, {"x": torch.tensor([step])},
                             _Saveable(), _Saveable(), keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000000002", "step-000000003"]
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 4, {}, {}, _Saveable(fail=True), _Saveable(), keep=2)
    # A failed (or killed) writer leaves no step-4 and no temp dir behind that looks complete.
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-000000003"
    assert ckpt.load_meta(latest)["policy_version"] == 3
    assert torch.equal(ckpt.load_state(latest)["x"], torch.tensor([3]))
    (tmp_path / ".tmp-step-000000005-x").mkdir()  # what kill -9 mid-write leaves
    assert ckpt.latest_checkpoint(tmp_path) == latest


def test_plot_command_writes_a_png(tmp_path: Path) -> None:
    lines = [{"step": s, "reward_mean": s * 0.1, "kl": 0.01 * s, "entropy": 3.0, "seconds_total": 1.0,
              "seconds_generate": 0.5} for s in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 0, result.output
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = CliRunner().invoke(app, ["plot", str(tmp_path / "nope")])
    assert missing.exit_code == 1
