"""Reward server bootstrap: the servicer, model loading on start, batcher shutdown on stop."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from flywheel.common.server import AioServiceServer, run_service
from flywheel.reward.config import RewardConfig
from flywheel.reward.core import ModelInfo, RewardService
from flywheel.reward.metrics import RewardMetrics
from flywheel.reward.servicer import SERVICE_NAME, RewardServicer, add_to_server

log = logging.getLogger(__name__)

INTERNAL_METHODS = (f"/{SERVICE_NAME}/PushWeights",)
REDIS_KEY = "flywheel:reward_model"


class RedisVersionRecord:
    """Keeps ``flywheel:reward_model`` (a hash) in step with the version scoring now, so status
    tools and the learner can read it without calling the service. Best effort: a Redis outage
    is logged and never blocks or fails scoring or a weight swap for more than the socket timeout."""

    def __init__(self, url: str) -> None:
        from flywheel.common.redis_store import connect

        self._client: Any = connect(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    def __call__(self, info: ModelInfo) -> None:
        self._client.hset(
            REDIS_KEY,
            mapping={
                "version": info.model_version,
                "model_id": info.model_id,
                "last_push_time": info.last_push_time.isoformat() if info.last_push_time else "",
                "metadata": json.dumps(info.metadata, sort_keys=True),
                "updated_at": f"{time.time():.3f}",
            },
        )

    def close(self) -> None:
        self._client.close()


def build_server(config: RewardConfig) -> AioServiceServer:
    """The reward server: scorers are built (and a bad module:function fails) here, the reward
    model loads in the on_load hook while health says NOT_SERVING. It is the asyncio server: a
    Score call mostly waits for its batch, and coroutines wait far cheaper than pool threads."""
    server = AioServiceServer("reward", config, [SERVICE_NAME], internal_methods=INTERNAL_METHODS)
    core = RewardService(config, RewardMetrics(server.registry, config.max_batch_size))
    if config.redis_url:
        # An empty redis_url would mean an embedded Redis; the record alone does not justify one.
        record = RedisVersionRecord(config.redis_url)
        core.version_listeners.append(record)
        server.on_shutdown(record.close)
    server.add_servicer(add_to_server, RewardServicer(core))
    server.on_load(core.load)
    server.on_shutdown(core.close)
    return server


def serve(config: RewardConfig) -> None:
    run_service(build_server(config))
