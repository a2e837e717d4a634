"""The learner against real generator and reward servers on free ports (tiny model, lexicon reward)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from flywheel.common import keys
from flywheel.common.health import free_port
from flywheel.generator.config import GeneratorConfig
from flywheel.generator.server import build_server as build_generator
from flywheel.learner.config import LearnerConfig
from flywheel.learner.server import build_server as build_learner
from flywheel.reward.config import RewardConfig
from flywheel.reward.server import build_server as build_reward
from flywheel.v1 import generator_pb2, generator_pb2_grpc, learner_pb2, learner_pb2_grpc
from tests.conftest import auth, wait_until

VADER = {"default": [{"name": "sentiment", "kind": "vader"}]}


def learner_config(server_config: dict[str, Any], tiny_llama_path: str, generator: str, reward: str,
                   **changes: Any) -> LearnerConfig:
    base: dict[str, Any] = dict(
        server_config, policy_model=tiny_llama_path, generator_targets=(generator,), reward_target=reward,
        checkpoint_dir=server_config["data_dir"] + "/ckpt", run_dir=server_config["data_dir"] + "/run",
        prompts_file="builtin://sentiment", prompts_per_step=2, samples_per_prompt=2, minibatch_size=2,
        ppo_epochs=1, max_new_tokens=6, learning_rate=1e-3, checkpoint_every=0, rpc_max_backoff=0.5,
    )
    base.update(changes)
    return LearnerConfig(**base)


@pytest.fixture
def generator(server_config: dict[str, Any], start_server: Any, tiny_llama_path: str) -> Any:
    return start_server(build_generator, GeneratorConfig(**server_config, model=tiny_llama_path))


@pytest.fixture
def reward(server_config: dict[str, Any], start_server: Any) -> Any:
    return start_server(build_reward, RewardConfig(**server_config, model="", scorers=VADER))


def _generator_policy(port: int, token: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = generator_pb2_grpc.GeneratorServiceStub(channel).GetPolicy(
            generator_pb2.GetPolicyRequest(), timeout=10, metadata=auth(token)
        )
    return int(reply.policy_version)


def _sample(port: int, token: str) -> list[tuple[list[int], list[float]]]:
    request = generator_pb2.GenerateRequest(
        prompts=[generator_pb2.Prompt(prompt_id="p", text="the movie was")],
        sampling=generator_pb2.SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=7),
        purpose=generator_pb2.REQUEST_PURPOSE_EVALUATION,
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = generator_pb2_grpc.GeneratorServiceStub(channel).Generate(request, timeout=60, metadata=auth(token))
    return [(list(c.token_ids), [round(x, 5) for x in c.logprobs]) for c in reply.results[0].completions]


def test_ppo_steps_train_every_parameter_and_push_each_version(
    generator: Any, reward: Any, server_config: dict[str, Any], start_server: Any, tiny_llama_path: str,
    internal_token: str, redis_client: Any,
) -> None:
    config = learner_config(server_config, tiny_llama_path, f"127.0.0.1:{generator.port}",
                            f"127.0.0.1:{reward.port}")
    server = start_server(build_learner, config)
    learner = server.learner
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}
    samples_before = _sample(generator.port, internal_token)

    for step in (1, 2):
        metrics = learner.run_step()
        assert learner.status().step == step
        assert learner.status().policy_version == step
        assert _generator_policy(generator.port, internal_token) == step
        assert metrics["push_replicas_ok"] == 1.0
        # The generator sampled with exactly the learner's weights (version step-1): the behaviour
        # logprobs it returned match the learner's recomputation for the same tokens.
        assert metrics["behaviour_logprob_diff"] < 1e-3, metrics

    unchanged = [n for n, p in learner.model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert unchanged == []
    assert _sample(generator.port, internal_token) != samples_before
    assert int(redis_client.hget(keys.POLICY, "version")) == 2
    lines = (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"reward_mean"' in lines[0]
    exported = {m.name for m in server.registry.collect()}
    for name in ("flywheel_learner_reward_mean", "flywheel_learner_kl", "flywheel_learner_policy_version",
                 "flywheel_learner_step_seconds"):
        assert name in exported, name


def test_restarted_generator_gets_the_current_version_repushed(
    generator: Any, reward: Any, server_config: dict[str, Any], start_server: Any, tiny_llama_path: str,
    internal_token: str, redis_client: Any,
) -> None:
    config = learner_config(server_config, tiny_llama_path, f"127.0.0.1:{generator.port}",
                            f"127.0.0.1:{reward.port}", delta_push=True)
    learner = start_server(build_learner, config).learner
    learner.run_step()
    learner.run_step()  # the second push is a delta against version 1
    generator.stop(0)  # the replica restarts on the same port and comes back at version 0
    start_server(build_generator, GeneratorConfig(**{**server_config, "port": generator.port},
                                                  model=tiny_llama_path))
    assert _generator_policy(generator.port, internal_token) == 0
    learner.sync_replicas()
    assert _generator_policy(generator.port, internal_token) == 2
    assert learner.run_step()["behaviour_logprob_diff"] < 1e-3


def test_learner_waits_for_a_dead_reward_service_and_recovers(
    generator: Any, server_config: dict[str, Any], start_server: Any, tiny_llama_path: str,
    internal_token: str, redis_client: Any,
) -> None:
    reward_port = free_port()
    config = learner_config(server_config, tiny_llama_path, f"127.0.0.1:{generator.port}",
                            f"127.0.0.1:{reward_port}", rpc_timeout=5.0)
    server = start_server(build_learner, config)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = learner_pb2_grpc.LearnerServiceStub(channel)

        def status() -> Any:
            return stub.GetStatus(learner_pb2.GetStatusRequest(), timeout=5, metadata=auth(internal_token)).status

        assert status().phase == learner_pb2.LEARNER_PHASE_IDLE
        stub.Resume(learner_pb2.ResumeRequest(), timeout=5, metadata=auth(internal_token))
        waiting = wait_until(lambda: (s := status()).phase == learner_pb2.LEARNER_PHASE_WAITING and s, 60,
                             "phase WAITING")
        assert "reward service" in waiting.waiting_reason and str(reward_port) in waiting.waiting_reason
        assert waiting.step == 0
        start_server(build_reward, RewardConfig(**{**server_config, "port": reward_port}, model="",
                                                scorers=VADER))
        wait_until(lambda: status().step >= 1, 120, "a step after the reward service came back")
        stub.Pause(learner_pb2.PauseRequest(reason="test"), timeout=5, metadata=auth(internal_token))
        wait_until(lambda: status().phase == learner_pb2.LEARNER_PHASE_PAUSED, 120, "phase PAUSED")
        assert "reward_mean" in status().last_metrics and status().paused


def test_each_update_reaches_every_generator_replica(
    generator: Any, reward: Any, server_config: dict[str, Any], start_server: Any, tiny_llama_path: str,
    internal_token: str, redis_client: Any,
) -> None:
    second = start_server(build_generator, GeneratorConfig(**server_config, model=tiny_llama_path))
    targets = (f"127.0.0.1:{generator.port}", f"127.0.0.1:{second.port}")
    config = learner_config(server_config, tiny_llama_path, targets[0], f"127.0.0.1:{reward.port}",
                            generator_targets=targets, delta_push=True)
    learner = start_server(build_learner, config).learner
    for step in (1, 2):  # a full push, then a delta, to both replicas
        metrics = learner.run_step()
        assert metrics["push_replicas_ok"] == 2.0
        assert [_generator_policy(g.port, internal_token) for g in (generator, second)] == [step, step]
    # Both replicas serve identical weights: the same seeded samples.
    assert _sample(generator.port, internal_token) == _sample(second.port, internal_token)
