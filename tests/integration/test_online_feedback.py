"""Learning from production feedback, end to end over real servers and a real Redis: completions from
the real generator, feedback through the SDK and the real feedback server, the learner fitting the
reward model and pushing it to the real reward service; the push refused when the held-out slice
says the new model is worse; and kill -9 of a learner process losing and double-counting nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from flywheel.common import keys
from flywheel.common.health import free_port
from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.server import build_server as build_feedback
from flywheel.generator.config import GeneratorConfig
from flywheel.generator.server import build_server as build_generator
from flywheel.learner import checkpoint as ckpt
from flywheel.learner.server import build_server as build_learner
from flywheel.reward.config import RewardConfig
from flywheel.reward.server import build_server as build_reward
from flywheel.v1 import learner_pb2, learner_pb2_grpc, reward_pb2, reward_pb2_grpc
from flywheel_client import AckStatus, ClientConfig, FlywheelClient, RetryPolicy
from tests.conftest import auth, wait_until
from tests.integration.test_learner import learner_config

PROBE = [("How was the movie?", "the movie was great!"), ("How was the movie?", "the movie was awful.")]


@pytest.fixture
def cluster(server_config: dict[str, Any], start_server: Any, tiny_llama_path: str, tiny_reward_path: str,
            redis_client: Any) -> dict[str, Any]:
    generator = start_server(build_generator, GeneratorConfig(**server_config, model=tiny_llama_path))
    reward = start_server(build_reward, RewardConfig(**server_config, model=tiny_reward_path))
    feedback = start_server(build_feedback, FeedbackConfig(**server_config))
    return {"generator": generator, "reward": reward, "feedback": feedback}


def sdk(cluster: dict[str, Any], api_key: str) -> FlywheelClient:
    return FlywheelClient(ClientConfig(
        generator_address=f"127.0.0.1:{cluster['generator'].port}",
        feedback_address=f"127.0.0.1:{cluster['feedback'].port}", api_key=api_key, timeout_s=60.0,
        retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.2)))


def feedback_config(server_config: dict[str, Any], tiny_llama_path: str, tiny_reward_path: str,
                    cluster: dict[str, Any], **changes: Any) -> Any:
    base = dict(feedback_learning=True, reward_model=tiny_reward_path, rm_fit_every_steps=1, rm_min_new_events=4,
                feedback_batch=8, rm_max_steps=4, rm_learning_rate=1e-3, rm_holdout_fraction=0.0)
    base.update(changes)
    return learner_config(server_config, tiny_llama_path, f"127.0.0.1:{cluster['generator'].port}",
                          f"127.0.0.1:{cluster['reward'].port}", **base)


def reward_scores(port: int, token: str, pairs: list[tuple[str, str]] = PROBE) -> tuple[list[float], int]:
    request = reward_pb2.ScoreRequest(samples=[reward_pb2.ScoreSample(sample_id=str(i), prompt=p, completion=c)
                                               for i, (p, c) in enumerate(pairs)])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = reward_pb2_grpc.RewardServiceStub(channel).Score(request, timeout=30, metadata=auth(token))
    return [s.components["rm"] for s in reply.scores], int(reply.model_version)


def reward_version(port: int, token: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = reward_pb2_grpc.RewardServiceStub(channel).GetModel(
            reward_pb2.GetModelRequest(), timeout=30, metadata=auth(token))
    return int(reply.model_version)


def submit_generated_feedback(fw: FlywheelClient, n_prompts: int, offset: int = 0) -> list[str]:
    """Per prompt: two production completions from the generator, then a comparison of them, a
    correction of the worse and a thumb on each (4 events); returns the acked event ids."""
    acks = []
    for i in range(offset, offset + n_prompts):
        result = fw.generate(f"the movie {i} was", n=2, max_new_tokens=6, seed=i)
        a, b = (c.completion_id for c in result.completions)
        acks += [fw.compare(a, b), fw.correct(b, f"the movie {i} was wonderful."), fw.rate(a, thumb="up"),
                 fw.rate(b, thumb="down")]
    assert all(ack.status is AckStatus.ACCEPTED for ack in acks), acks
    return [ack.event_id for ack in acks]


def fit_records(run_dir: str) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r.get("event") == "rm_fit"]


def pending(redis_client: Any) -> int:
    return int(redis_client.xpending(keys.FEEDBACK_STREAM, keys.FEEDBACK_GROUP)["pending"])


def test_sdk_feedback_fits_the_reward_model_and_changes_its_scores(
    cluster: dict[str, Any], server_config: dict[str, Any], start_server: Any, tiny_llama_path: str,
    tiny_reward_path: str, internal_token: str, api_key: str, redis_client: Any,
) -> None:
    reward_port = cluster["reward"].port
    config = feedback_config(server_config, tiny_llama_path, tiny_reward_path, cluster, rm_min_new_events=8)
    server = start_server(build_learner, config)
    learner = server.learner
    before, version = reward_scores(reward_port, internal_token)
    assert version == 0
    with sdk(cluster, api_key) as fw:
        event_ids = submit_generated_feedback(fw, 2)

    learner.run_step()
    [fit] = fit_records(config.run_dir)
    assert fit["event_ids"] == event_ids and fit["pushed"] and fit["rm_version"] == 1
    assert fit["train_pairs"] == 6  # 2 comparisons + 2 corrections + 2 pairs of opposite thumbs
    after, version = reward_scores(reward_port, internal_token)
    assert version == 1 and after != before
    assert pending(redis_client) == 0  # the checkpoint holds the fit: every event acked
    latest = ckpt.latest_checkpoint(config.checkpoint_dir)
    assert latest is not None and ckpt.reward_model_dir(latest) is not None
    assert ckpt.load_state(latest)["feedback"]["windows"][-1]["event_ids"] == event_ids
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        status = learner_pb2_grpc.LearnerServiceStub(channel).GetStatus(
            learner_pb2.GetStatusRequest(), timeout=10, metadata=auth(internal_token)).status
    assert status.reward_model_version == 1
    exported = {s.name: s.value for m in server.registry.collect() for s in m.samples}
    assert exported['flywheel_learner_rm_fits_total'] == 1.0
    assert exported["flywheel_learner_feedback_events_consumed_total"] == 8.0

    # The reward service restarts (back to its base model, version 0): the learner re-pushes version 1.
    cluster["reward"].stop(0)
    start_server(build_reward, RewardConfig(**{**server_config, "port": reward_port}, model=tiny_reward_path))
    assert reward_version(reward_port, internal_token) == 0
    learner.run_step()
    assert reward_scores(reward_port, internal_token) == (after, 1)


def test_push_is_skipped_when_the_new_model_is_worse_on_the_held_out_slice(
    cluster: dict[str, Any], server_config: dict[str, Any], start_server: Any, tiny_llama_path: str,
    tiny_reward_path: str, internal_token: str, api_key: str, redis_client: Any,
) -> None:
    config = feedback_config(server_config, tiny_llama_path, tiny_reward_path, cluster, rm_min_new_events=8,
                             rm_holdout_fraction=0.25, rm_max_steps=10, rm_learning_rate=2e-3)
    learner = start_server(build_learner, config).learner
    (first, second), _ = reward_scores(cluster["reward"].port, internal_token)
    prompt = PROBE[0][0]
    liked, disliked = (PROBE[0][1], PROBE[1][1]) if first > second else (PROBE[1][1], PROBE[0][1])
    with sdk(cluster, api_key) as fw:
        # Training (older) events contradict the current model; the held-out (newest) ones agree.
        acks = [fw.compare(disliked, liked, prompt=prompt) for _ in range(6)]
        acks += [fw.compare(liked, disliked, prompt=prompt) for _ in range(2)]
    learner.run_step()
    [fit] = fit_records(config.run_dir)
    assert (fit["train_pairs"], fit["heldout_pairs"]) == (6, 2)
    assert fit["previous_accuracy"] == 1.0 and fit["heldout_accuracy"] == 0.0
    assert not fit["pushed"] and "not pushed" in fit["reason"]
    assert reward_version(cluster["reward"].port, internal_token) == 0
    assert learner.status().reward_model_version == 0
    assert fit["event_ids"] == [a.event_id for a in acks] and pending(redis_client) == 0


def _learner_env(config: Any, internal_token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    values = {
        "INTERNAL_TOKEN": internal_token, "REDIS_URL": config.redis_url, "API_KEYS_FILE": config.api_keys_file,
        "DATA_DIR": config.data_dir, "LEARNER_METRICS_PORT": "0", "LEARNER_AUTOSTART": "true",
        "LEARNER_POLICY_MODEL": config.policy_model, "LEARNER_GENERATOR_TARGETS": config.generator_targets[0],
        "LEARNER_REWARD_TARGET": config.reward_target, "LEARNER_CHECKPOINT_DIR": config.checkpoint_dir,
        "LEARNER_RUN_DIR": config.run_dir, "LEARNER_PROMPTS_FILE": config.prompts_file,
        "LEARNER_PROMPTS_PER_STEP": "2", "LEARNER_SAMPLES_PER_PROMPT": "2", "LEARNER_MINIBATCH_SIZE": "2",
        "LEARNER_PPO_EPOCHS": "1", "LEARNER_MAX_NEW_TOKENS": "6", "LEARNER_CHECKPOINT_EVERY": "0",
        "LEARNER_FEEDBACK_LEARNING": "true", "LEARNER_REWARD_MODEL": config.reward_model,
        "LEARNER_RM_FIT_EVERY_STEPS": "1", "LEARNER_RM_MIN_NEW_EVENTS": str(config.rm_min_new_events),
        "LEARNER_FEEDBACK_BATCH": str(config.feedback_batch), "LEARNER_RM_MAX_STEPS": str(config.rm_max_steps),
        "LEARNER_RM_HOLDOUT_FRACTION": str(config.rm_holdout_fraction),
    }
    env.update({f"FLYWHEEL_{k}": v for k, v in values.items()})
    return env


def _windows(checkpoint_dir: str) -> list[list[str]]:
    latest = ckpt.latest_checkpoint(checkpoint_dir)
    if latest is None:
        return []
    state = ckpt.load_state(latest).get("feedback") or {}
    return [w["event_ids"] for w in state.get("windows", [])]


def test_kill_9_mid_run_neither_loses_nor_double_counts_feedback(
    cluster: dict[str, Any], server_config: dict[str, Any], start_server: Any, tiny_llama_path: str,
    tiny_reward_path: str, internal_token: str, api_key: str, redis_client: Any, tmp_path: Path,
) -> None:
    config = feedback_config(server_config, tiny_llama_path, tiny_reward_path, cluster, rm_holdout_fraction=0.25)
    log_path = tmp_path / "learner.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "serve", "learner", "--port",
                                 str(free_port())], env=_learner_env(config, internal_token), stdout=log_file,
                                stderr=subprocess.STDOUT)
    try:
        def alive() -> None:
            if proc.poll() is not None:
                raise AssertionError(log_path.read_text()[-3000:])

        with sdk(cluster, api_key) as fw:
            event_ids = submit_generated_feedback(fw, 2)  # 8 events: one fit
            wait_until(lambda: alive() or _windows(config.checkpoint_dir), 300, "a checkpointed fit")
            event_ids += submit_generated_feedback(fw, 4, offset=2)  # 16 more, read while training
        wait_until(lambda: alive() or pending(redis_client) > 0, 120, "the learner reading the new events")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_run_fits = fit_records(config.run_dir)

    learner = start_server(build_learner, config).learner  # resumes from the checkpoint, same consumer
    for _ in range(10):
        if sorted(i for w in _windows(config.checkpoint_dir) for i in w) == sorted(event_ids):
            break
        learner.run_step()
    windows = _windows(config.checkpoint_dir)
    trained = Counter(i for w in windows for i in w)
    assert sorted(trained) == sorted(event_ids) and max(trained.values()) == 1  # each event exactly once
    logged = Counter(i for fit in fit_records(config.run_dir) for i in fit["event_ids"])
    assert max(logged.values()) == 1 and set(logged) <= set(event_ids)  # never counted twice across runs
    assert len(fit_records(config.run_dir)) > len(killed_run_fits) >= 1
    assert pending(redis_client) == 0
    assert reward_version(cluster["reward"].port, internal_token) == learner.feedback.rm_version >= 1


def test_online_dpo_step_on_generator_samples_ranked_by_the_reward_service(
    cluster: dict[str, Any], server_config: dict[str, Any], start_server: Any, tiny_llama_path: str,
    internal_token: str, redis_client: Any,
) -> None:
    import torch

    config = learner_config(server_config, tiny_llama_path, f"127.0.0.1:{cluster['generator'].port}",
                            f"127.0.0.1:{cluster['reward'].port}", algorithm="dpo", samples_per_prompt=2,
                            minibatch_size=2)
    learner = start_server(build_learner, config).learner
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}
    metrics = learner.run_step()
    assert metrics["dpo_pairs"] >= 1 and metrics["push_replicas_ok"] == 1.0
    assert learner.status().policy_version == 1
    assert [n for n, p in learner.model.named_parameters() if torch.equal(p, before[n])] == []
