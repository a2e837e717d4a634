"""The policy registry on a real Redis: lineage records, promotion, bit-exact snapshots, pruning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from flywheel.common import keys
from flywheel.learner.registry import NotRestorable, PolicyEntry, PolicyRegistry, UnknownVersion


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(8, 4, generator=g)
    # A tied head (shared storage, which safetensors refuses as-is) and an odd dtype.
    return {"embed.weight": embed, "lm_head.weight": embed, "norm.weight": torch.randn(4, generator=g).half()}


def _registry(redis_client: Any, tmp_path: Path, keep: int = 2) -> PolicyRegistry:
    return PolicyRegistry(redis_client, str(tmp_path / "ckpt"), keep)


def _register(registry: PolicyRegistry, version: int, **fields: Any) -> PolicyEntry:
    entry = PolicyEntry(version, parent_version=version - 1, **fields)
    entry.checkpoint_uri = registry.save_snapshot(version, _state(version))
    registry.record(entry)
    return entry


def test_snapshots_restore_bit_for_bit(redis_client: Any, tmp_path: Path) -> None:
    registry = _registry(redis_client, tmp_path)
    entry = _register(registry, 3)
    assert entry.checkpoint_uri == str(tmp_path / "ckpt" / "policies" / "v3" / "model.safetensors")
    restored = registry.load_snapshot(3)
    for name, tensor in _state(3).items():
        assert restored[name].dtype == tensor.dtype
        assert torch.equal(restored[name].view(torch.uint8), tensor.contiguous().view(torch.uint8)), name


def test_records_keep_lineage_newest_first_and_current_only_moves_forward(redis_client: Any, tmp_path: Path) -> None:
    registry = _registry(redis_client, tmp_path, keep=10)
    for version in (1, 2, 3):
        _register(registry, version, step=version, reward_model_version=7, data_window="w",
                  metrics={"reward_mean": 0.5})
    registry.record(PolicyEntry(2, parent_version=1, reason="late duplicate"))  # older: not current
    assert registry.current_version() == 3
    assert int(redis_client.hget(keys.POLICY, "version")) == 3
    entries = registry.entries(limit=2)
    assert [e.version for e in entries] == [3, 2]
    third = registry.get(3)
    assert third is not None
    assert (third.parent_version, third.step, third.reward_model_version, third.data_window) == (2, 3, 7, "w")
    assert third.metrics == {"reward_mean": 0.5} and registry.restorable(third)
    registry.update_metrics(3, {"eval_reward": 0.25})
    assert registry.get(3).metrics == {"reward_mean": 0.5, "eval_reward": 0.25}  # type: ignore[union-attr]


def test_promote_marks_known_good_and_unknown_versions_are_refused(redis_client: Any, tmp_path: Path) -> None:
    registry = _registry(redis_client, tmp_path)
    _register(registry, 1)
    with pytest.raises(UnknownVersion):
        registry.promote(9)
    assert registry.promoted_version() is None
    assert registry.promote(1).promoted
    assert registry.promoted_version() == 1 and registry.promoted_versions() == {1}
    with pytest.raises(UnknownVersion):
        registry.load_snapshot(9)


def test_pruning_keeps_the_newest_and_the_promoted(redis_client: Any, tmp_path: Path) -> None:
    registry = _registry(redis_client, tmp_path, keep=2)
    _register(registry, 1)
    registry.promote(1)
    for version in (2, 3, 4, 5):
        _register(registry, version)
    on_disk = sorted(p.name for p in (tmp_path / "ckpt" / "policies").iterdir())
    assert on_disk == ["v1", "v4", "v5"]
    with pytest.raises(NotRestorable):
        registry.load_snapshot(2)
    with pytest.raises(NotRestorable):
        registry.promote(3)
    assert not registry.restorable(registry.get(2))  # type: ignore[arg-type]
    assert torch.equal(registry.load_snapshot(1)["embed.weight"], _state(1)["embed.weight"])


def test_zero_snapshots_disables_them(redis_client: Any, tmp_path: Path) -> None:
    registry = _registry(redis_client, tmp_path, keep=0)
    assert registry.save_snapshot(1, _state(1)) == ""
    assert not (tmp_path / "ckpt" / "policies").exists()
