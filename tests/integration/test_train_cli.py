"""`flywheel train sft|reward|dpo` on tiny models: real TRL training steps, every parameter moves."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flywheel.common.tiny_models import NEGATIVE, POSITIVE, SUBJECTS

CLI = [sys.executable, "-m", "flywheel.cli", "train"]


def _pairs(path: Path, n: int = 24) -> Path:
    rng = random.Random(0)
    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"prompt": rng.choice(SUBJECTS), "chosen": f" was {rng.choice(POSITIVE)}.",
                                 "rejected": f" was {rng.choice(NEGATIVE)}."}) + "\n")
    return path


def _sft(path: Path, n: int = 16) -> Path:
    rng = random.Random(1)
    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"prompt": rng.choice(SUBJECTS), "completion": f" was {rng.choice(POSITIVE)}."}) + "\n")
    return path


def _weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.mark.parametrize(
    ("stage", "base_fixture", "make_data", "lr"),
    [("sft", "tiny_llama_path", _sft, "1e-3"), ("reward", "tiny_reward_path", _pairs, "1e-3"),
     ("dpo", "tiny_llama_path", _pairs, "1e-3")],
)
def test_train_stage_updates_every_parameter(
    stage: str, base_fixture: str, make_data: object, lr: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    base = request.getfixturevalue(base_fixture)
    data = make_data(tmp_path / "data.jsonl")  # type: ignore[operator]
    out = tmp_path / "out"
    result = subprocess.run(
        [*CLI, stage, "--data", str(data), "--out", str(out), "--model", base, "--max-steps", "3", "--lr", lr,
         "--batch-size", "4"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in entry for entry in logged)
    before, after = _weights(base), _weights(out)
    assert before.keys() == after.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []
    if stage == "reward":
        assert 0.0 <= summary["held_out_accuracy"] <= 1.0


def test_train_rejects_data_without_needed_columns(tmp_path: Path) -> None:
    data = _sft(tmp_path / "sft.jsonl")
    result = subprocess.run([*CLI, "dpo", "--data", str(data), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "dpo needs a non-empty string column 'chosen'" in " ".join(result.stderr.split())
    assert not (tmp_path / "o").exists()
