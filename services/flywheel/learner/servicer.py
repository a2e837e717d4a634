"""LearnerService over gRPC: status and control of the training loop (proto <-> core types)."""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from flywheel.common import keys
from flywheel.learner.core import Learner, LearnerStatus
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

    def ListPolicies(self, request: Any, context: grpc.ServicerContext) -> Any:
        redis = self.learner.redis
        if redis is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the learner has no Redis connection yet")
        limit = request.limit or 50
        current = self.learner.status().policy_version
        records = []
        for raw in redis.hvals(keys.POLICY_REGISTRY):
            entry = json.loads(raw)
            stamp = Timestamp()
            stamp.FromNanoseconds(int(float(entry.get("created_at", 0)) * 1e9))
            records.append(learner_pb2.PolicyRecord(
                version=int(entry["version"]), parent_version=int(entry.get("parent_version", -1)),
                step=int(entry.get("step", 0)), checkpoint_uri=entry.get("checkpoint_uri", ""),
                created_at=stamp, metrics={k: float(v) for k, v in entry.get("metrics", {}).items()},
                current=int(entry["version"]) == current,
            ))
        records.sort(key=lambda r: r.version, reverse=True)
        return learner_pb2.ListPoliciesResponse(policies=records[:limit])

    def RollbackPolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "RollbackPolicy is not implemented yet: restore an earlier checkpoint by moving newer "
            "step-* directories out of checkpoint_dir and restarting the learner",
        )
