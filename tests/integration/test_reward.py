"""Reward Score over real gRPC on a free port, with the tiny reward model."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from flywheel.common.config import ConfigError
from flywheel.common.server import ServiceServer
from flywheel.reward.config import RewardConfig
from flywheel.reward.server import build_server
from flywheel.v1 import reward_pb2, reward_pb2_grpc
from tests.conftest import auth, wait_until

MIX = {
    "default": [
        {"name": "rm", "kind": "model", "weight": 1.0},
        {"name": "sentiment", "kind": "vader", "weight": 0.5},
        {"name": "brevity", "kind": "length_penalty", "weight": 0.1, "params": {"target_chars": 20}},
    ],
    "rules_only": [
        {"name": "bang", "kind": "rule", "params": {"function": "tests.unit.reward.sample_rules:exclamations"}}
    ],
}
TEXTS = [
    ("How was the film?", "The movie was wonderful, I loved it!"),
    ("How was the food?", "terrible and awful."),
    ("Any plans?", "our trip was fun today."),
]


@dataclass
class RewardClient:
    server: ServiceServer
    channel: grpc.Channel
    stub: reward_pb2_grpc.RewardServiceStub

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.server.registry.get_sample_value(name, labels or {}) or 0.0


def start_reward(
    start_server: Callable[..., Any], server_config: dict[str, Any], model: str, **changes: Any
) -> RewardClient:
    config = RewardConfig(**{**server_config, "model": model, "scorers": MIX, **changes})
    server = start_server(build_server, config)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    return RewardClient(server, channel, reward_pb2_grpc.RewardServiceStub(channel))


def request(texts: list[tuple[str, str]] = TEXTS, scorer: str = "") -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(
        samples=[reward_pb2.ScoreSample(sample_id=f"s{i}", prompt=p, completion=c) for i, (p, c) in enumerate(texts)],
        scorer=scorer,
    )


LONG_WAIT_MS = 60_000.0  # batches form because they are full, never because time passed


def test_scores_are_deterministic_and_mixes_are_weighted_sums(
    start_server: Callable[..., Any], server_config: dict[str, Any], tiny_reward_path: str, api_key: str
) -> None:
    client = start_reward(start_server, server_config, tiny_reward_path)
    first = client.stub.Score(request(), metadata=auth(api_key), timeout=30)
    second = client.stub.Score(request(), metadata=auth(api_key), timeout=30)
    assert list(first.scores) == list(second.scores)
    assert first.model_version == second.model_version == 0
    for sample, s in zip(request().samples, first.scores, strict=True):
        assert s.sample_id == sample.sample_id
        c = s.components
        assert set(c) == {"rm", "sentiment", "brevity"}
        assert s.raw_reward == pytest.approx(c["rm"] + 0.5 * c["sentiment"] + 0.1 * c["brevity"], abs=1e-6)
        assert s.reward == s.raw_reward
    assert first.scores[0].components["sentiment"] > 0 > first.scores[1].components["sentiment"]
    rules = client.stub.Score(request(scorer="rules_only"), metadata=auth(api_key), timeout=30)
    assert [s.components["bang"] for s in rules.scores] == [1.0, 0.0, 0.0]  # module:function rule
    info = client.stub.GetModel(reward_pb2.GetModelRequest(), metadata=auth(api_key), timeout=30)
    assert info.model_version == 0 and info.model_id == tiny_reward_path
    assert {s.name: s.kind for s in info.scorers}["default.rm"] == "model"


def test_concurrent_calls_merge_into_one_model_batch(
    start_server: Callable[..., Any], server_config: dict[str, Any], tiny_reward_path: str, api_key: str
) -> None:
    n = 8
    client = start_reward(
        start_server, server_config, tiny_reward_path, max_batch_size=n, max_wait_ms=LONG_WAIT_MS
    )
    texts = [TEXTS[i % 3] for i in range(n)]
    together = client.stub.Score(request(texts), metadata=auth(api_key), timeout=60)  # a full batch
    calls = [client.stub.Score.future(request([t]), metadata=auth(api_key), timeout=60) for t in texts]
    replies = [f.result() for f in calls]
    # The n single-sample calls ran as ONE batch of n: with this max_wait a batch forms only when full.
    assert client.metric("flywheel_reward_batch_size_samples_count") == 2
    assert client.metric("flywheel_reward_batch_size_samples_sum") == 2 * n
    for reply, alone in zip(replies, together.scores, strict=True):
        assert reply.scores[0].components["rm"] == pytest.approx(alone.components["rm"], abs=1e-5)
    text = urllib.request.urlopen(f"http://127.0.0.1:{client.server.metrics_port}/metrics", timeout=10).read()
    assert b"flywheel_reward_samples_total" in text and b"flywheel_reward_model_version 0.0" in text


def test_bad_inputs_are_invalid_argument_with_precise_messages(
    start_server: Callable[..., Any], server_config: dict[str, Any], tiny_reward_path: str, api_key: str
) -> None:
    client = start_reward(
        start_server, server_config, tiny_reward_path, max_samples_per_request=4, max_text_chars=50
    )
    cases = [
        (request([]), "samples is empty"),
        (request([TEXTS[0]] * 5), r"samples has 5 entries; the limit is 4 \(max_samples_per_request\)"),
        (request([TEXTS[0], ("p", "x" * 51)]), r"samples\[1\].completion has 51 characters; the limit is 50"),
        (request([TEXTS[0]], scorer="nope"), "scorer 'nope' is not configured here; configured sets: default, rules_only"),
    ]  # fmt: skip
    for message, expected in cases:
        with pytest.raises(grpc.RpcError) as info:
            client.stub.Score(message, metadata=auth(api_key), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert expected.replace("\\", "") in info.value.details() or pytest.fail(info.value.details())
    raw_score = client.channel.unary_unary("/flywheel.v1.RewardService/Score")
    for wire in (b"\x0a\x03\x12\x01\xff", b"\x0a\x05\x12"):  # invalid UTF-8; truncated message
        with pytest.raises(grpc.RpcError) as info:
            raw_score(wire, metadata=auth(api_key), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "is not a valid flywheel.v1.ScoreRequest" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Score(request(), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert client.metric("flywheel_reward_samples_total", {"scorer": "default"}) == 0  # nothing half-scored


def test_full_queue_is_resource_exhausted_with_retry_hint(
    start_server: Callable[..., Any], server_config: dict[str, Any], tiny_reward_path: str, api_key: str
) -> None:
    client = start_reward(
        start_server, server_config, tiny_reward_path,
        max_queue=2, max_samples_per_request=2, max_batch_size=8, max_wait_ms=LONG_WAIT_MS,
    )  # fmt: skip
    waiting = client.stub.Score.future(request(TEXTS[:2]), metadata=auth(api_key), timeout=120)
    wait_until(lambda: client.metric("flywheel_reward_queue_depth_samples") == 2, 30, "the first request to queue")
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Score(request(TEXTS[:1]), metadata=auth(api_key), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(info.value.trailing_metadata() or ())
    assert int(trailers["retry-after-ms"]) >= 1
    assert f"retry after {trailers['retry-after-ms']} ms" in info.value.details()
    assert client.metric("flywheel_reward_rejected_requests_total", {"reason": "queue_full"}) == 1
    waiting.cancel()


def test_cancelled_request_is_dropped_from_the_batch(
    start_server: Callable[..., Any], server_config: dict[str, Any], tiny_reward_path: str, api_key: str
) -> None:
    client = start_reward(start_server, server_config, tiny_reward_path, max_batch_size=3, max_wait_ms=LONG_WAIT_MS)
    doomed = client.stub.Score.future(request(TEXTS[:1]), metadata=auth(api_key), timeout=120)
    wait_until(lambda: client.metric("flywheel_reward_queue_depth_samples") == 1, 30, "the request to queue")
    doomed.cancel()
    done = {"method": "Score", "code": "CANCELLED"}
    wait_until(lambda: client.metric("flywheel_reward_rpc_requests_total", done) == 1, 30, "the server to see the cancel")
    # Two more samples plus the cancelled one still queued fill a batch of 3: it forms at once,
    # without the cancelled sample.
    pair = client.stub.Score(request(TEXTS[1:]), metadata=auth(api_key), timeout=120)
    assert len(pair.scores) == 2
    assert client.metric("flywheel_reward_dropped_samples_total") == 1
    assert client.metric("flywheel_reward_batch_size_samples_sum") == 2  # only live samples were scored


def test_normalisation_is_applied_and_reported(
    start_server: Callable[..., Any], server_config: dict[str, Any], tiny_reward_path: str, api_key: str
) -> None:
    client = start_reward(start_server, server_config, tiny_reward_path, normalize=True, clip=0.5)
    reply = client.stub.Score(request(), metadata=auth(api_key), timeout=30)
    n = reply.normalization
    assert (n.enabled, n.count, n.clip) == (True, 3, 0.5) and n.std > 0
    for s in reply.scores:
        assert s.reward == pytest.approx(max(-0.5, min(0.5, (s.raw_reward - n.mean) / n.std)), abs=1e-6)
    assert client.stub.Score(request(), metadata=auth(api_key), timeout=30).normalization.count == 6


def test_bad_rule_path_fails_at_startup(server_config: dict[str, Any], tiny_reward_path: str) -> None:
    bad = {"default": [{"name": "r", "kind": "rule", "params": {"function": "tests.nowhere:reward"}}]}
    config = RewardConfig(**{**server_config, "model": tiny_reward_path, "scorers": bad})
    with pytest.raises(ConfigError, match=r"cannot import 'tests\.nowhere'"):
        build_server(config)


def test_concurrent_callers_all_get_their_own_scores(
    start_server: Callable[..., Any], server_config: dict[str, Any], tiny_reward_path: str, api_key: str
) -> None:
    client = start_reward(start_server, server_config, tiny_reward_path, max_batch_size=4, max_wait_ms=1.0)
    alone = client.stub.Score(request(), metadata=auth(api_key), timeout=30)
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            for _ in range(3):
                reply = client.stub.Score(request(), metadata=auth(api_key), timeout=60)
                for a, b in zip(reply.scores, alone.scores, strict=True):
                    assert a.sample_id == b.sample_id
                    assert a.components["rm"] == pytest.approx(b.components["rm"], abs=1e-5)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors


def test_deadline_passed_in_the_queue_is_deadline_exceeded_and_dropped(
    start_server: Callable[..., Any], server_config: dict[str, Any], tiny_reward_path: str, api_key: str
) -> None:
    client = start_reward(start_server, server_config, tiny_reward_path, max_batch_size=3, max_wait_ms=LONG_WAIT_MS)
    with pytest.raises(grpc.RpcError) as info:  # the batch never fills: only the deadline ends the wait
        client.stub.Score(request(TEXTS[:1]), metadata=auth(api_key), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    expired = {"method": "Score", "code": "DEADLINE_EXCEEDED"}
    wait_until(lambda: client.metric("flywheel_reward_rpc_requests_total", expired) == 1, 30, "the server to see it")
    pair = client.stub.Score(request(TEXTS[1:]), metadata=auth(api_key), timeout=120)
    assert len(pair.scores) == 2
    assert client.metric("flywheel_reward_dropped_samples_total") == 1
    assert client.metric("flywheel_reward_batch_size_samples_sum") == 2


def test_a_blocking_user_rule_does_not_hold_up_other_callers(
    start_server: Callable[..., Any], server_config: dict[str, Any], tiny_reward_path: str, api_key: str
) -> None:
    from tests.unit.reward import sample_rules

    gated = {"name": "g", "kind": "rule", "params": {"function": "tests.unit.reward.sample_rules:gated"}}
    scorers = {**MIX, "gated": [gated]}
    client = start_reward(start_server, server_config, tiny_reward_path, scorers=scorers, max_wait_ms=1.0)
    sample_rules.GATE.clear()
    sample_rules.ENTERED.clear()
    held = client.stub.Score.future(request(TEXTS[:1], scorer="gated"), metadata=auth(api_key), timeout=120)
    try:
        assert sample_rules.ENTERED.wait(30)
        # The rule is blocked inside the server; the event loop still serves everyone else.
        for scorer in ("", "rules_only"):
            reply = client.stub.Score(request(scorer=scorer), metadata=auth(api_key), timeout=30)
            assert len(reply.scores) == len(TEXTS)
        assert not held.done()
    finally:
        sample_rules.GATE.set()
    assert held.result().scores[0].reward == 1.0
