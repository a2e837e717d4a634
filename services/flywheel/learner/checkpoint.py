"""Atomic checkpoints: write everything into a temp dir, fsync each file and the dir, rename.

A reader only ever sees ``step-XXXXXXXXX`` directories that are complete (rename is atomic on one
filesystem), so ``kill -9`` at any moment leaves the previous checkpoint loadable; leftover
``.tmp-*`` directories of a killed writer are removed on the next save. Layout:

    step-000000010/
      policy/        save_pretrained weights + tokenizer (a generator can serve this path)
      learner.pt     value head / critic, optimizer, scheduler, KL controller, RNG, data position
      reward_model/  with feedback learning: the fitted reward model (save_pretrained + tokenizer)
      meta.json      step, policy_version, algorithm, time (written last, read first)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PREFIX = "step-"
META = "meta.json"
STATE = "learner.pt"
POLICY = "policy"
REWARD_MODEL = "reward_model"


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:09d}"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(
    directory: str | Path,
    step: int,
    meta: dict[str, Any],
    state: dict[str, Any],
    policy: Any,
    tokenizer: Any,
    keep: int,
    reward_model: tuple[Any, Any] | None = None,
) -> Path:
    """Writes checkpoint ``step`` atomically, prunes to the newest ``keep``; returns its path.
    ``reward_model``: (model, tokenizer) of the learner's fitted reward model, saved in the same rename."""
    root = Path(directory).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{final.name}-"))
    try:
        policy.save_pretrained(tmp / POLICY, safe_serialization=True)
        tokenizer.save_pretrained(tmp / POLICY)
        if reward_model is not None:
            reward_model[0].save_pretrained(tmp / REWARD_MODEL, safe_serialization=True)
            reward_model[1].save_pretrained(tmp / REWARD_MODEL)
        torch.save(state, tmp / STATE)
        (tmp / META).write_text(json.dumps({**meta, "step": step, "saved_at": time.time()}, indent=1))
        _fsync_tree(tmp)
        if final.exists():  # the same step saved twice (Checkpoint RPC right after a periodic one)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_meta(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / META).read_text()))


def load_state(path: Path) -> dict[str, Any]:
    # Our own file (optimizer state, RNG tuples, numpy arrays): not weights-only.
    return dict(torch.load(path / STATE, map_location="cpu", weights_only=False))


def reward_model_dir(path: Path) -> Path | None:
    """The reward model saved in checkpoint ``path`` (loadable with from_pretrained), if any."""
    found = path / REWARD_MODEL
    return found if (found / "config.json").is_file() else None


def load_policy_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for file in sorted((path / POLICY).glob("*.safetensors")):
        weights.update(load_file(file))
    return weights
