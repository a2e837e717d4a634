"""Reward-model updates over real gRPC: PushWeights (stream and URI), verification, atomicity, auth."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification

from flywheel.common.weight_push import push_weights
from flywheel.common.weights import iter_push_messages, iter_uri_push_messages
from flywheel.v1 import reward_pb2
from tests.conftest import auth
from tests.integration.test_reward import RewardClient, request, start_reward


@pytest.fixture(scope="module")
def base_state(tiny_reward_path: str) -> dict[str, torch.Tensor]:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_path, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A new version: the scoring head and one layer perturbed."""
    g = torch.Generator().manual_seed(seed)
    new = {k: v.clone() for k, v in state.items()}
    for name in ("score.weight", "model.layers.0.mlp.up_proj.weight"):
        new[name] += 0.5 * torch.randn(new[name].shape, generator=g)
    return new


def push(client: RewardClient, messages: Iterator[tuple[str, Any]], secret: str) -> Any:
    stream = (reward_pb2.RewardServicePushWeightsRequest(**{kind: msg}) for kind, msg in messages)
    return client.stub.PushWeights(stream, metadata=auth(secret), timeout=60)


def rm_scores(client: RewardClient, api_key: str) -> tuple[list[float], int]:
    reply = client.stub.Score(request(), metadata=auth(api_key), timeout=30)
    return [s.components["rm"] for s in reply.scores], reply.model_version


def test_pushes_change_scores_and_bump_the_version(
    start_server: Callable[..., Any], server_config: dict[str, Any], tiny_reward_path: str,
    base_state: dict[str, torch.Tensor], internal_token: str, api_key: str, redis_client: Any, tmp_path: Path,
) -> None:  # fmt: skip
    client = start_reward(start_server, server_config, tiny_reward_path)
    before, version = rm_scores(client, api_key)
    assert version == 0 and client.metric("flywheel_reward_model_version") == 0
    assert redis_client.hget("flywheel:reward_model", "version") == b"0"

    v1 = changed(base_state, 1)
    reply = push(client, iter_push_messages(v1, 1, metadata={"step": "10"}), internal_token)
    assert (reply.result.version, reply.result.previous_version) == (1, 0)
    assert reply.result.tensors_updated == len(base_state) and reply.result.bytes_received > 0
    after, version = rm_scores(client, api_key)
    assert version == 1 and after != before
    info = client.stub.GetModel(reward_pb2.GetModelRequest(), metadata=auth(api_key), timeout=30)
    assert info.model_version == 1 and info.metadata["step"] == "10" and info.last_push_time.seconds > 0
    assert redis_client.hget("flywheel:reward_model", "version") == b"1"

    v2 = changed(v1, 2)  # a delta against version 1: only the changed tensors travel
    reply = push(client, iter_push_messages(v2, 2, base=v1, base_version=1), internal_token)
    assert reply.result.version == 2 and reply.result.tensors_updated == 2
    delta_scores, version = rm_scores(client, api_key)
    assert version == 2 and delta_scores != after

    file = tmp_path / "rm-v3.safetensors"
    save_file(base_state, str(file))  # back to the original weights, by URI
    reply = push(client, iter_uri_push_messages(f"file://{file}", 3, state=base_state), internal_token)
    assert reply.result.version == 3
    assert rm_scores(client, api_key) == (before, 3)
    assert client.metric("flywheel_reward_model_version") == 3
    assert client.metric("flywheel_reward_pushes_total") == 3


def _with_bad_checksum(messages: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    for kind, msg in messages:
        if kind == "chunk" and msg.tensor_name == "score.weight":
            data = bytearray(msg.data)
            data[0] ^= 0xFF
            msg.data = bytes(data)
        yield kind, msg


def test_bad_pushes_are_rejected_and_scoring_is_untouched(
    start_server: Callable[..., Any], server_config: dict[str, Any], tiny_reward_path: str,
    base_state: dict[str, torch.Tensor], internal_token: str, api_key: str, tmp_path: Path,
) -> None:  # fmt: skip
    client = start_reward(start_server, server_config, tiny_reward_path)
    before = rm_scores(client, api_key)
    good = changed(base_state, 3)
    nan = {**good, "score.weight": torch.full_like(good["score.weight"], float("nan"))}
    wrong_shape = {**good, "score.weight": torch.zeros(2, good["score.weight"].shape[1])}
    missing = {k: v for k, v in good.items() if k != "score.weight"}
    bad_file = tmp_path / "bad.safetensors"
    save_file(nan, str(bad_file))
    cases = [
        (_with_bad_checksum(iter_push_messages(good, 1)), internal_token, grpc.StatusCode.DATA_LOSS, "checksum_mismatch"),
        (iter_push_messages(nan, 1), internal_token, grpc.StatusCode.INVALID_ARGUMENT, "non_finite"),
        (iter_push_messages(wrong_shape, 1), internal_token, grpc.StatusCode.INVALID_ARGUMENT, "shape_mismatch"),
        (iter_push_messages(missing, 1), internal_token, grpc.StatusCode.INVALID_ARGUMENT, "missing_tensor"),
        (iter_uri_push_messages(f"file://{bad_file}", 1), internal_token, grpc.StatusCode.INVALID_ARGUMENT, "non_finite"),
        (iter_push_messages(good, 0), internal_token, grpc.StatusCode.FAILED_PRECONDITION, "stale_version"),
        (iter_push_messages(good, 1), api_key, grpc.StatusCode.PERMISSION_DENIED, ""),
        (iter_push_messages(good, 1), "not-a-secret", grpc.StatusCode.UNAUTHENTICATED, ""),
    ]  # fmt: skip
    for messages, secret, code, reason in cases:
        with pytest.raises(grpc.RpcError) as info:
            push(client, messages, secret)
        assert info.value.code() == code, info.value.details()
        if reason:
            assert f"push rejected ({reason})" in info.value.details()
            assert "version 0 still scoring" in info.value.details()
            assert client.metric("flywheel_reward_push_failures_total", {"reason": reason}) >= 1
        assert rm_scores(client, api_key) == before  # bit-identical scores, same version
    stream = iter([reward_pb2.RewardServicePushWeightsRequest(commit={"num_chunks": 0})])
    with pytest.raises(grpc.RpcError) as info:
        client.stub.PushWeights(stream, timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert client.metric("flywheel_reward_pushes_total") == 0


def test_tcp_side_channel_push_reaches_the_reward_model(
    start_server: Callable[..., Any], server_config: dict[str, Any], tiny_reward_path: str,
    base_state: dict[str, torch.Tensor], internal_token: str, api_key: str,
) -> None:  # fmt: skip
    client = start_reward(start_server, server_config, tiny_reward_path)
    before, _ = rm_scores(client, api_key)
    target = f"127.0.0.1:{client.server.port}"
    v1 = changed(base_state, 1)
    results = push_weights([target], v1, 1, token=internal_token, stub="reward", transport="tcp", timeout=60)
    assert not isinstance(results[target], Exception), results[target]
    assert results[target].version == 1
    after, version = rm_scores(client, api_key)
    assert version == 1 and after != before
