"""Feedback server bootstrap."""

from __future__ import annotations

from flywheel.common.server import ServiceServer, run_service
from flywheel.feedback.config import FeedbackConfig
from flywheel.v1 import feedback_pb2, feedback_pb2_grpc

SERVICE_NAME = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name


def build_server(config: FeedbackConfig) -> ServiceServer:
    server = ServiceServer("feedback", config, [SERVICE_NAME])
    # Until ingestion lands, the generated base servicer answers every RPC with UNIMPLEMENTED.
    server.add_servicer(
        feedback_pb2_grpc.add_FeedbackServiceServicer_to_server, feedback_pb2_grpc.FeedbackServiceServicer()
    )
    return server


def serve(config: FeedbackConfig) -> None:
    run_service(build_server(config))
