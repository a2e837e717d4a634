"""LearnerService over gRPC: status and control of the training loop (proto <-> core types)."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from flywheel.learner.core import Learner, LearnerStatus
from flywheel.learner.registry import NotRestorable, PolicyEntry, PolicyRegistry, UnknownVersion
from flywheel.v1 import learner_pb2, learner_pb2_grpc

log = logging.getLogger(__name__)

PHASES = {
    "starting": learner_pb2.LEARNER_PHASE_STARTING,
    "generating": learner_pb2.LEARNER_PHASE_GENERATING,
    "scoring": learner_pb2.LEARNER_PHASE_SCORING,
    "training": learner_pb2.LEARNER_PHASE_TRAINING,
    "pushing": learner_pb2.LEARNER_PHASE_PUSHING,
    "checkpointing": learner_pb2.LEARNER_PHASE_CHECKPOINTING,
    "paused": learner_pb2.LEARNER_PHASE_PAUSED,
    "waiting": learner_pb2.LEARNER_PHASE_WAITING,
    "idle": learner_pb2.LEARNER_PHASE_IDLE,
}
MAX_REASON = 1024
DEFAULT_LIST = 50
MAX_LIST = 10_000


def status_pb(status: LearnerStatus) -> learner_pb2.LearnerStatus:
    out = learner_pb2.LearnerStatus(
        step=status.step, policy_version=status.policy_version, phase=PHASES.get(status.phase, learner_pb2.LEARNER_PHASE_UNSPECIFIED),
        paused=status.paused, algorithm=status.algorithm, last_metrics=status.last_metrics,
        run_dir=status.run_dir, last_checkpoint_path=status.last_checkpoint_path,
        reward_model_version=status.reward_model_version, waiting_reason=status.waiting_reason,
    )
    if status.last_checkpoint_time:
        stamp = Timestamp()
        stamp.FromNanoseconds(int(status.last_checkpoint_time * 1e9))
        out.last_checkpoint_time.CopyFrom(stamp)
    return out


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    def __init__(self, learner: Learner) -> None:
        self.learner = learner
        self.loaded = False  # set by the server's load hook

    def _require_loaded(self, context: grpc.ServicerContext) -> None:
        if not self.loaded:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the learner is still loading its models")

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        return learner_pb2.GetStatusResponse(status=status_pb(self.learner.status()))

    def Pause(self, request: Any, context: grpc.ServicerContext) -> Any:
        if len(request.reason) > MAX_REASON:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"reason is longer than {MAX_REASON} characters")
        self.learner.pause(request.reason)
        return learner_pb2.PauseResponse(status=status_pb(self.learner.status()))

    def Resume(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._require_loaded(context)
        self.learner.resume()
        return learner_pb2.ResumeResponse(status=status_pb(self.learner.status()))

    def Checkpoint(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._require_loaded(context)
        try:
            path = self.learner.save_checkpoint()  # waits for the current step to finish
        except OSError as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"checkpoint failed: {exc}")
        status = self.learner.status()
        return learner_pb2.CheckpointResponse(path=str(path), step=status.step,
                                              policy_version=status.policy_version)

    def _registry(self, context: grpc.ServicerContext) -> PolicyRegistry:
        self._require_loaded(context)
        publisher = self.learner.publisher
        if publisher is None or publisher.redis is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the learner has no policy registry (no Redis) yet")
        assert publisher is not None  # abort raised otherwise
        return publisher.registry

    def ListPolicies(self, request: Any, context: grpc.ServicerContext) -> Any:
        registry = self._registry(context)
        if request.limit > MAX_LIST:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"limit={request.limit}: at most {MAX_LIST}")
        current = self.learner.status().policy_version
        entries = registry.entries(request.limit or DEFAULT_LIST)
        return learner_pb2.ListPoliciesResponse(policies=[record_pb(e, current, registry) for e in entries])

    def PromotePolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        registry = self._registry(context)
        if request.version < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"version={request.version}: must be >= 0")
        try:
            entry = self.learner.promote_policy(request.version)
        except UnknownVersion:
            context.abort(grpc.StatusCode.NOT_FOUND, f"policy version {request.version} is not registered")
        except NotRestorable as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return learner_pb2.PromotePolicyResponse(
            policy=record_pb(entry, self.learner.status().policy_version, registry))

    def RollbackPolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._registry(context)
        version = request.version if request.HasField("version") else None
        if version is not None and version < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"version={version}: must be >= 0 (unset = default)")
        if len(request.reason) > MAX_REASON:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"reason is longer than {MAX_REASON} characters")
        try:  # waits for the current step to finish
            new_version, restored = self.learner.rollback_policy(version, "manual")
        except UnknownVersion as exc:
            what = f"policy version {version} is not registered" if version is not None else str(exc.args[0])
            context.abort(grpc.StatusCode.NOT_FOUND, what)
        except NotRestorable as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except RuntimeError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        log.warning("rollback by RPC%s: version %d restored as %d",
                    f" ({request.reason})" if request.reason else "", restored, new_version)
        return learner_pb2.RollbackPolicyResponse(new_policy_version=new_version, restored_from_version=restored)


def record_pb(entry: PolicyEntry, current: int, registry: PolicyRegistry) -> learner_pb2.PolicyRecord:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(entry.created_at * 1e9))
    return learner_pb2.PolicyRecord(
        version=entry.version, parent_version=entry.parent_version, step=entry.step,
        reward_model_version=entry.reward_model_version, checkpoint_uri=entry.checkpoint_uri, created_at=stamp,
        metrics={k: float(v) for k, v in entry.metrics.items()}, data_window=entry.data_window,
        current=entry.version == current, restored_from_version=entry.restored_from, promoted=entry.promoted,
        reason=entry.reason, restorable=registry.restorable(entry),
    )
