"""The policy registry: every pushed version with its lineage in Redis, and its weights on disk so any
recent (or promoted) version can be restored bit for bit.

Redis layout (``flywheel.common.keys``):
  ``flywheel:policy``           hash: version, step, updated_at, checkpoint_uri, pusher (the current
                                version, written only if newer), promoted_version (the known-good one),
                                promoted_versions (comma list of every version ever promoted)
  ``flywheel:policy:registry``  hash: version -> JSON of ``PolicyEntry``

Snapshots: ``{checkpoint_dir}/policies/v{N}/model.safetensors``, the exact tensors pushed as version
N, written atomically (temp dir + rename). The newest ``keep_policy_snapshots`` are kept, plus every
promoted version; a pruned version stays listed but is no longer restorable.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from flywheel.common import keys

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "policies"
SNAPSHOT_FILE = "model.safetensors"

# Writes the version as current only if it is newer than the recorded one (monotonic even with two
# learners); the registry entry is written either way.
_RECORD_SCRIPT = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '-1')
redis.call('HSET', KEYS[2], ARGV[1], ARGV[6])
if tonumber(ARGV[1]) <= current then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'step', ARGV[2], 'updated_at', ARGV[3],
           'checkpoint_uri', ARGV[4], 'pusher', ARGV[5])
return 1
"""


class UnknownVersion(KeyError):
    """No such version in the registry."""


class NotRestorable(Exception):
    """The version is registered but its weight snapshot is gone (pruned) or was never written."""


@dataclass
class PolicyEntry:
    """One registered policy version and where it came from."""

    version: int
    parent_version: int = -1
    step: int = 0
    reward_model_version: int = 0
    data_window: str = ""
    checkpoint_uri: str = ""
    created_at: float = field(default_factory=time.time)
    metrics: dict[str, float] = field(default_factory=dict)
    restored_from: int = -1
    reason: str = "train"
    promoted: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> PolicyEntry:
        data = json.loads(raw)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class PolicyRegistry:
    def __init__(self, redis: Any, checkpoint_dir: str, keep_snapshots: int, pusher: str = "learner") -> None:
        self.redis = redis
        self.root = Path(checkpoint_dir).expanduser() / SNAPSHOT_DIR
        self.keep_snapshots = keep_snapshots
        self.pusher = pusher

    # --- snapshots ---------------------------------------------------------------------------
    def snapshot_path(self, version: int) -> Path:
        return self.root / f"v{version}" / SNAPSHOT_FILE

    def save_snapshot(self, version: int, state: Mapping[str, torch.Tensor]) -> str:
        """Writes ``state`` as version ``version``'s snapshot (atomically); returns its path ("" if off)."""
        if self.keep_snapshots == 0:
            return ""
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        seen: set[int] = set()
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():  # tied weights share storage, which safetensors refuses
            t = tensor.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            tensors[name] = t.clone() if ptr in seen else t
            seen.add(ptr)
        final = self.snapshot_path(version).parent
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-v{version}-"))
        try:
            save_file(tensors, str(tmp / SNAPSHOT_FILE), metadata={"policy_version": str(version)})
            with open(tmp / SNAPSHOT_FILE, "rb") as f:
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return str(final / SNAPSHOT_FILE)

    def load_snapshot(self, version: int) -> dict[str, torch.Tensor]:
        """The exact tensors of ``version``; UnknownVersion / NotRestorable otherwise."""
        from safetensors.torch import load_file

        entry = self.get(version)
        if entry is None:
            raise UnknownVersion(version)
        path = Path(entry.checkpoint_uri) if entry.checkpoint_uri else self.snapshot_path(version)
        if not path.is_file():
            raise NotRestorable(f"version {version} has no weight snapshot any more (pruned: keep_policy_snapshots"
                                f"={self.keep_snapshots}; promote versions to keep them)")
        return load_file(str(path))

    def restorable(self, entry: PolicyEntry) -> bool:
        return bool(entry.checkpoint_uri) and Path(entry.checkpoint_uri).is_file()

    def prune(self) -> None:
        """Keeps the newest ``keep_snapshots`` snapshots and the promoted ones."""
        if not self.root.is_dir():
            return
        for stale in self.root.glob(".tmp-v*"):
            if time.time() - stale.stat().st_mtime > 3600:  # a killed writer's leftovers
                shutil.rmtree(stale, ignore_errors=True)
        found = sorted((int(p.name[1:]) for p in self.root.iterdir()
                        if p.is_dir() and p.name[:1] == "v" and p.name[1:].isdigit()), reverse=True)
        keep = set(found[: self.keep_snapshots]) | self.promoted_versions()
        for version in found:
            if version not in keep:
                shutil.rmtree(self.snapshot_path(version).parent, ignore_errors=True)

    # --- records ------------------------------------------------------------------------------
    def record(self, entry: PolicyEntry) -> None:
        """Registers ``entry`` and makes it the current version if it is the newest."""
        if self.redis is None:
            return
        self.redis.eval(_RECORD_SCRIPT, 2, keys.POLICY, keys.POLICY_REGISTRY, entry.version, entry.step,
                        time.time(), entry.checkpoint_uri, self.pusher, entry.to_json())

    def get(self, version: int) -> PolicyEntry | None:
        if self.redis is None:
            return None
        raw = self.redis.hget(keys.POLICY_REGISTRY, str(version))
        return PolicyEntry.from_json(raw) if raw is not None else None

    def entries(self, limit: int = 0) -> list[PolicyEntry]:
        """Registered versions, newest first (at most ``limit``; 0 = all)."""
        if self.redis is None:
            return []
        found = sorted((PolicyEntry.from_json(raw) for raw in self.redis.hvals(keys.POLICY_REGISTRY)),
                       key=lambda e: e.version, reverse=True)
        return found[:limit] if limit else found

    def update_metrics(self, version: int, metrics: Mapping[str, float]) -> None:
        entry = self.get(version)
        if entry is not None:
            entry.metrics.update(metrics)
            self.redis.hset(keys.POLICY_REGISTRY, str(version), entry.to_json())

    def current_version(self) -> int:
        if self.redis is None:
            return 0
        value = self.redis.hget(keys.POLICY, "version")
        return int(value) if value is not None else 0

    # --- promotion -------------------------------------------------------------------------------
    def promote(self, version: int) -> PolicyEntry:
        """Marks ``version`` as the known-good one (kept on disk, the default rollback target)."""
        entry = self.get(version)
        if entry is None:
            raise UnknownVersion(version)
        if not self.restorable(entry):
            raise NotRestorable(f"version {version} has no weight snapshot any more: it cannot be a rollback "
                                f"target")
        entry.promoted = True
        self.redis.hset(keys.POLICY_REGISTRY, str(version), entry.to_json())
        promoted = sorted(self.promoted_versions() | {version})
        self.redis.hset(keys.POLICY, mapping={"promoted_version": version,
                                              "promoted_versions": ",".join(map(str, promoted))})
        log.info("promoted policy version %d", version)
        return entry

    def promoted_version(self) -> int | None:
        if self.redis is None:
            return None
        value = self.redis.hget(keys.POLICY, "promoted_version")
        return int(_text(value)) if value is not None else None

    def promoted_versions(self) -> set[int]:
        """Every version ever promoted (their snapshots are never pruned)."""
        if self.redis is None:
            return set()
        value = self.redis.hget(keys.POLICY, "promoted_versions")
        return {int(v) for v in _text(value).split(",") if v} if value else set()
