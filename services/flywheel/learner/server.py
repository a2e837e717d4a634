"""Learner server bootstrap."""

from __future__ import annotations

from flywheel.common.server import ServiceServer, run_service
from flywheel.learner.config import LearnerConfig
from flywheel.v1 import learner_pb2, learner_pb2_grpc

SERVICE_NAME = learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].full_name
INTERNAL_METHODS = tuple(f"/{SERVICE_NAME}/{m}" for m in ("Pause", "Resume", "Checkpoint", "RollbackPolicy"))


def build_server(config: LearnerConfig) -> ServiceServer:
    server = ServiceServer("learner", config, [SERVICE_NAME], internal_methods=INTERNAL_METHODS)
    # Until training lands, the generated base servicer answers every RPC with UNIMPLEMENTED.
    server.add_servicer(
        learner_pb2_grpc.add_LearnerServiceServicer_to_server, learner_pb2_grpc.LearnerServiceServicer()
    )
    return server


def serve(config: LearnerConfig) -> None:
    run_service(build_server(config))
