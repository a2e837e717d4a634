"""The SDK against real generator and feedback servers: generate → rate the completion it returned,
streaming, the async client, and a bad request surfacing as a typed error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.server import build_server as build_feedback
from flywheel.generator.config import GeneratorConfig
from flywheel.generator.server import build_server as build_generator
from flywheel_client import AsyncFlywheelClient, ClientConfig, FlywheelClient, FlywheelError


@pytest.fixture
def servers(
    start_server: Callable[..., Any], server_config: dict[str, Any], tiny_llama_path: str, redis_client: Any,
) -> tuple[Any, Any]:  # fmt: skip
    """(generator, feedback) servers, in this process."""
    generator = start_server(build_generator, GeneratorConfig(**server_config, model=tiny_llama_path))
    return generator, start_server(build_feedback, FeedbackConfig(**server_config))


@pytest.fixture
def cluster(servers: tuple[Any, Any], api_key: str) -> ClientConfig:
    generator, feedback = servers
    return ClientConfig(generator_address=f"127.0.0.1:{generator.port}",
                        feedback_address=f"127.0.0.1:{feedback.port}", api_key=api_key, timeout_s=60)


def test_generate_then_rate_the_logged_completion(cluster: ClientConfig, redis_client: Any) -> None:
    with FlywheelClient(cluster) as fw:
        result = fw.generate("the movie was", max_new_tokens=6, seed=1, user_id="u1")
        completion = result.completions[0]
        assert completion.completion_id and completion.logged
        assert len(completion.token_ids) == len(completion.logprobs) > 0
        assert redis_client.exists(f"flywheel:completion:{completion.completion_id}")

        results = fw.generate(["a", "b"], n=2, max_new_tokens=4, seed=2)
        assert [len(r.completions) for r in results] == [2, 2]

        ack = fw.rate(completion.completion_id, thumb="up")
        assert ack.stored
        stream = redis_client.xrange("flywheel:feedback")
        assert len(stream) == 1 and completion.completion_id.encode() in stream[0][1][b"record"]


def test_stream_matches_unary_with_the_same_seed(cluster: ClientConfig) -> None:
    with FlywheelClient(cluster) as fw:
        unary = fw.generate("my day felt", max_new_tokens=8, seed=5, temperature=0.9).completions[0]
        chunks = list(fw.generate_stream("my day felt", max_new_tokens=8, seed=5, temperature=0.9))
    assert chunks[-1].finish_reason
    assert [t for c in chunks for t in c.token_ids] == unary.token_ids
    assert "".join(c.text_delta for c in chunks) == unary.text
    assert len({c.completion_id for c in chunks}) == 1


def test_bad_generate_request_is_a_typed_error_not_a_retry(cluster: ClientConfig, servers: tuple[Any, Any]) -> None:
    with FlywheelClient(cluster) as fw, pytest.raises(FlywheelError) as err:
        fw.generate("x", max_new_tokens=100_000)
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "max_new_tokens" in err.value.details
    refused = {"method": "Generate", "code": "INVALID_ARGUMENT"}
    assert servers[0].registry.get_sample_value("flywheel_generator_rpc_requests_total", refused) == 1  # one try


async def test_async_client_generates_and_rates(cluster: ClientConfig) -> None:
    async with AsyncFlywheelClient(cluster) as fw:
        result = await fw.generate("the food", max_new_tokens=5, seed=3)
        chunks = [c async for c in fw.generate_stream("the food", max_new_tokens=5, seed=3)]
        ack = await fw.rate(result.completion_id, score=4, score_range=(1, 5))
    assert [t for c in chunks for t in c.token_ids] == result.completions[0].token_ids
    assert ack.stored
