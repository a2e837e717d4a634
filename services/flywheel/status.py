"""Status of running services: health, plus policy/model version where the service reports one."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from flywheel.common.health import health_status
from flywheel.v1 import (
    generator_pb2,
    generator_pb2_grpc,
    learner_pb2,
    learner_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)


@dataclass
class ServiceStatus:
    name: str
    address: str
    health: str
    detail: str


def _detail(name: str, channel: grpc.Channel, metadata: list[tuple[str, str]]) -> str:
    try:
        if name == "generator":
            policy = generator_pb2_grpc.GeneratorServiceStub(channel).GetPolicy(
                generator_pb2.GetPolicyRequest(), timeout=2, metadata=metadata
            )
            return f"policy v{policy.policy_version} ({policy.engine}, {policy.model_id})"
        if name == "reward":
            model = reward_pb2_grpc.RewardServiceStub(channel).GetModel(
                reward_pb2.GetModelRequest(), timeout=2, metadata=metadata
            )
            return f"reward model v{model.model_version} ({model.model_id})"
        if name == "learner":
            status = (
                learner_pb2_grpc.LearnerServiceStub(channel)
                .GetStatus(learner_pb2.GetStatusRequest(), timeout=2, metadata=metadata)
                .status
            )
            return f"step {status.step}, policy v{status.policy_version}, {learner_pb2.LearnerPhase.Name(status.phase)}"
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
            return "-"
        return f"{exc.code().name}: {exc.details()}"
    return "-"


def collect_status(addresses: dict[str, str], api_key: str = "") -> list[ServiceStatus]:
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
    rows = []
    for name, address in addresses.items():
        health = health_status(address)
        detail = ""
        if health == "SERVING":
            with grpc.insecure_channel(address) as channel:
                detail = _detail(name, channel, metadata)
        rows.append(ServiceStatus(name, address, health, detail))
    return rows
