"""Generator server bootstrap."""

from __future__ import annotations

from flywheel.common.server import ServiceServer, run_service
from flywheel.generator.config import GeneratorConfig
from flywheel.v1 import generator_pb2, generator_pb2_grpc

SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name
INTERNAL_METHODS = (f"/{SERVICE_NAME}/PushWeights",)


def build_server(config: GeneratorConfig) -> ServiceServer:
    server = ServiceServer("generator", config, [SERVICE_NAME], internal_methods=INTERNAL_METHODS)
    # Until the engine lands, the generated base servicer answers every RPC with UNIMPLEMENTED.
    server.add_servicer(
        generator_pb2_grpc.add_GeneratorServiceServicer_to_server,
        generator_pb2_grpc.GeneratorServiceServicer(),
    )
    return server


def serve(config: GeneratorConfig) -> None:
    run_service(build_server(config))
