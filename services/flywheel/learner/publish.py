"""Publishing policy versions: push to every generator replica in parallel, keep versions monotonic,
record the current version in Redis, and bring lagging replicas (e.g. restarted) up to date.

A replica that acknowledged the previous version gets a delta against it (when ``delta_push``);
any other replica gets the full weights. ``sync`` asks every replica its version (GetPolicy): an
older one gets the current version re-pushed in full; a newer one (pushed by a learner run whose
checkpoint was lost, or before a kill -9) makes the learner jump past it, so versions never repeat.
Every new version is registered (``registry.py``: lineage in Redis, weight snapshot on disk).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from flywheel.common.server import channel_options
from flywheel.common.weight_push import push_weights
from flywheel.learner.config import LearnerConfig
from flywheel.learner.registry import PolicyEntry, PolicyRegistry
from flywheel.learner.targets import resolve_targets
from flywheel.v1 import generator_pb2, generator_pb2_grpc

log = logging.getLogger(__name__)

@dataclass
class PushReport:
    version: int
    ok: list[str]
    failed: dict[str, str]
    bytes_sent: int
    seconds: float
    kind: str


class PolicyPublisher:
    def __init__(self, config: LearnerConfig, redis: Any, pusher: str = "learner") -> None:
        self.config = config
        self.redis = redis
        self.pusher = pusher
        self.acked: dict[str, int] = {}  # replica -> version it confirmed
        self.base: dict[str, torch.Tensor] | None = None  # the state of the last pushed version
        self.base_version = -1
        self.registry = PolicyRegistry(redis, config.checkpoint_dir, config.keep_policy_snapshots, pusher)
        # Whether the replicas' versions must be checked (``sync``) before the next generation: at
        # start (a replica may be ahead after a lost checkpoint), and after any push or version
        # query failed (a replica restarted, or was down). Asking every step would cost a GetPolicy
        # round trip per replica per step for nothing; a restarted replica also shows up on its own,
        # as a failed delta push (its base no longer matches).
        self.needs_sync = True

    # --- replica versions ------------------------------------------------------------------
    def replica_versions(self) -> dict[str, int | Exception]:
        """GetPolicy on every replica in parallel (short deadline): version or the error."""
        targets = resolve_targets(self.config.generator_targets)
        metadata = [("authorization", f"Bearer {self.config.internal_token}")]

        def ask(target: str) -> int | Exception:
            try:
                with grpc.insecure_channel(target, options=channel_options(self.config.max_message_bytes)) as ch:
                    reply = generator_pb2_grpc.GeneratorServiceStub(ch).GetPolicy(
                        generator_pb2.GetPolicyRequest(), timeout=min(10.0, self.config.rpc_timeout),
                        metadata=metadata,
                    )
                return int(reply.policy_version)
            except grpc.RpcError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=max(1, min(len(targets), 32))) as pool:
            return dict(zip(targets, pool.map(ask, targets), strict=True))

    def recorded_version(self) -> int:
        return self.registry.current_version()

    # --- pushes ------------------------------------------------------------------------------
    def push(self, state: Mapping[str, torch.Tensor], version: int, targets: list[str],
             metadata: Mapping[str, str], owned: bool = False) -> PushReport:
        """Pushes ``version`` to ``targets``: deltas where the replica has the base, full elsewhere.
        ``owned``: ``state`` is a private copy nobody modifies, kept as the next delta's base as is."""
        start = time.perf_counter()
        use_delta = self.config.delta_push and self.base is not None
        delta_targets = [t for t in targets if use_delta and self.acked.get(t) == self.base_version]
        full_targets = [t for t in targets if t not in delta_targets]
        results: dict[str, Any] = {}
        common = dict(token=self.config.internal_token, timeout=self.config.push_timeout,
                      max_message_bytes=self.config.max_message_bytes, pusher=self.pusher,
                      metadata=dict(metadata))
        if delta_targets:
            results.update(push_weights(delta_targets, state, version, base=self.base,
                                        base_version=self.base_version, **common))  # type: ignore[arg-type]
        if full_targets:
            results.update(push_weights(full_targets, state, version, **common))  # type: ignore[arg-type]
        report = PushReport(version, [], {}, 0, 0.0, "delta" if delta_targets and not full_targets else
                            "full" if not delta_targets else "mixed")
        for target, outcome in results.items():
            if isinstance(outcome, Exception):
                detail = f"{outcome.code().name}: {outcome.details()}" if isinstance(outcome, grpc.RpcError) \
                    else repr(outcome)
                report.failed[target] = detail
                self.acked.pop(target, None)  # it gets a full push next time
                self.needs_sync = True
                log.warning("push of version %d to %s failed: %s", version, target, detail)
            else:
                report.ok.append(target)
                report.bytes_sent += int(outcome.bytes_received)
                self.acked[target] = version
        if not self.config.delta_push:
            self.base = None
        else:
            self.base = dict(state) if owned else {name: t.detach().clone() for name, t in state.items()}
        self.base_version = version
        report.seconds = time.perf_counter() - start
        return report

    def sync(self, state: Mapping[str, torch.Tensor], version: int, step: int) -> tuple[int, PushReport | None]:
        """Makes every replica serve ``version``; returns (the version now current, the push if any).

        Replicas behind get ``version`` in full; if any replica is *ahead*, the current weights are
        pushed to all as a new version above it (versions never repeat or go back).
        """
        requested = version
        versions = self.replica_versions()
        reachable = {t: v for t, v in versions.items() if isinstance(v, int)}
        for target, err in versions.items():
            if not isinstance(err, int):
                self.acked.pop(target, None)
        self.needs_sync = len(reachable) < len(versions)  # ask again next time for those not reached
        ahead = max([*reachable.values(), self.recorded_version()], default=0)
        targets = [t for t, v in reachable.items() if v != version]
        if ahead > version:
            log.warning("a replica or the policy record is at version %d, ahead of ours (%d): "
                        "pushing our weights as version %d", ahead, version, ahead + 1)
            version, targets = ahead + 1, list(reachable)
            self.base, self.base_version = None, -1
        for target, v in reachable.items():
            if v == version:
                self.acked.setdefault(target, version)
        if version != requested:
            self.register(PolicyEntry(version, parent_version=requested, step=step, reason="resync"), state)
        if not targets:
            return version, None
        for target in targets:
            self.acked.pop(target, None)  # full push: their weights are not our base
            log.info("replica %s serves version %d, pushing version %d (full)", target, reachable[target], version)
        report = self.push(state, version, targets, {"step": str(step), "reason": "resync"})
        return version, report

    def register(self, entry: PolicyEntry, state: Mapping[str, torch.Tensor]) -> PolicyEntry:
        """Snapshots ``state`` as ``entry.version`` and records the entry (current if newest); no-op without Redis."""
        if self.redis is None:
            return entry
        entry.checkpoint_uri = self.registry.save_snapshot(entry.version, state)
        self.registry.record(entry)
        return entry
