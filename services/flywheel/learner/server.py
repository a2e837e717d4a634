"""Learner server bootstrap: models, Redis and the latest checkpoint load in the on_load hook (no
network calls to generator or reward, so it reports SERVING even while they are down); the
training loop runs in a background thread, started by ``autostart`` or the Resume RPC."""

from __future__ import annotations

import logging

from flywheel.common.redis_store import open_redis
from flywheel.common.server import ServiceServer, run_service
from flywheel.learner.config import LearnerConfig
from flywheel.learner.core import Learner
from flywheel.learner.metrics import LearnerMetrics
from flywheel.learner.publish import PolicyPublisher
from flywheel.learner.rollout import GrpcRollouts
from flywheel.learner.servicer import LearnerServicer
from flywheel.v1 import learner_pb2, learner_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].full_name
INTERNAL_METHODS = tuple(f"/{SERVICE_NAME}/{m}" for m in ("Pause", "Resume", "Checkpoint", "RollbackPolicy",
                                                                  "PromotePolicy"))


def build_server(config: LearnerConfig) -> ServiceServer:
    server = ServiceServer("learner", config, [SERVICE_NAME], internal_methods=INTERNAL_METHODS)
    learner = Learner(config, LearnerMetrics(server.registry))
    servicer = LearnerServicer(learner)
    server.add_servicer(learner_pb2_grpc.add_LearnerServiceServicer_to_server, servicer)
    server.learner = learner  # type: ignore[attr-defined]  # tests and benches reach the loop

    def load() -> None:
        client, embedded = open_redis(config.redis_url, config.data_dir)

        def close_redis() -> None:
            client.close()
            if embedded is not None:
                embedded.close()

        server.on_shutdown(close_redis)
        learner.redis = client
        learner.rollouts = GrpcRollouts(config, learner.stop_event, learner.on_wait)
        learner.publisher = PolicyPublisher(config, client, pusher=f"learner@{config.host}:{server.port}")
        learner.load()
        servicer.loaded = True
        learner.start()
        # Runs before Redis closes (reverse order): stop the loop, checkpoint new progress.
        server.on_shutdown(lambda: learner.close(timeout=max(config.grace_seconds, 5.0)))

    server.on_load(load)
    return server


def serve(config: LearnerConfig) -> None:
    run_service(build_server(config))
