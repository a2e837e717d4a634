"""Reward server bootstrap."""

from __future__ import annotations

from flywheel.common.server import ServiceServer, run_service
from flywheel.reward.config import RewardConfig
from flywheel.v1 import reward_pb2, reward_pb2_grpc

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
INTERNAL_METHODS = (f"/{SERVICE_NAME}/PushWeights",)


def build_server(config: RewardConfig) -> ServiceServer:
    server = ServiceServer("reward", config, [SERVICE_NAME], internal_methods=INTERNAL_METHODS)
    # Until the scorers land, the generated base servicer answers every RPC with UNIMPLEMENTED.
    server.add_servicer(
        reward_pb2_grpc.add_RewardServiceServicer_to_server, reward_pb2_grpc.RewardServiceServicer()
    )
    return server


def serve(config: RewardConfig) -> None:
    run_service(build_server(config))
