"""kill -9 of a learner process (`flywheel serve learner`, autostart) leaves a checkpoint that a new
learner resumes from exactly: same step, version, weights and optimizer state; then it trains on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import torch

from flywheel.common.health import free_port
from flywheel.learner import checkpoint as ckpt
from flywheel.learner.server import build_server as build_learner
from flywheel.v1 import learner_pb2, learner_pb2_grpc
from tests.conftest import auth, wait_until
from tests.integration import test_learner as shared
from tests.integration.test_learner import _generator_policy, learner_config

generator = shared.generator  # the same fixtures: real generator and reward servers
reward = shared.reward


def _assert_same(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_kill_9_then_resume_continues_from_the_checkpoint(
    generator: Any, reward: Any, server_config: dict[str, Any], start_server: Any, tiny_llama_path: str,
    internal_token: str, redis_client: Any, tmp_path: Path,
) -> None:
    config = learner_config(server_config, tiny_llama_path, f"127.0.0.1:{generator.port}",
                            f"127.0.0.1:{reward.port}", checkpoint_every=1, keep_checkpoints=2)
    port = free_port()
    env = {
        **os.environ,
        "FLYWHEEL_INTERNAL_TOKEN": internal_token, "FLYWHEEL_REDIS_URL": config.redis_url,
        "FLYWHEEL_API_KEYS_FILE": config.api_keys_file, "FLYWHEEL_DATA_DIR": config.data_dir,
        "FLYWHEEL_LEARNER_METRICS_PORT": "0", "FLYWHEEL_LEARNER_AUTOSTART": "true",
        "FLYWHEEL_LEARNER_POLICY_MODEL": tiny_llama_path,
        "FLYWHEEL_LEARNER_GENERATOR_TARGETS": config.generator_targets[0],
        "FLYWHEEL_LEARNER_REWARD_TARGET": config.reward_target,
        "FLYWHEEL_LEARNER_CHECKPOINT_DIR": config.checkpoint_dir, "FLYWHEEL_LEARNER_RUN_DIR": config.run_dir,
        "FLYWHEEL_LEARNER_PROMPTS_FILE": config.prompts_file, "FLYWHEEL_LEARNER_PROMPTS_PER_STEP": "2",
        "FLYWHEEL_LEARNER_SAMPLES_PER_PROMPT": "2", "FLYWHEEL_LEARNER_MINIBATCH_SIZE": "2",
        "FLYWHEEL_LEARNER_PPO_EPOCHS": "1", "FLYWHEEL_LEARNER_MAX_NEW_TOKENS": "6",
        "FLYWHEEL_LEARNER_LEARNING_RATE": "1e-3", "FLYWHEEL_LEARNER_CHECKPOINT_EVERY": "1",
        "FLYWHEEL_LEARNER_KEEP_CHECKPOINTS": "2",
    }
    log_file = open(tmp_path / "learner.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "serve", "learner", "--port", str(port)],
                            env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        def two_checkpoints() -> bool:
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "learner.log").read_text()[-3000:])
            return len(ckpt.list_checkpoints(config.checkpoint_dir)) >= 2
        wait_until(two_checkpoints, 240, "two checkpoints from the learner process")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log_file.close()

    latest = ckpt.latest_checkpoint(config.checkpoint_dir)
    assert latest is not None and len(ckpt.list_checkpoints(config.checkpoint_dir)) <= 2
    meta, saved = ckpt.load_meta(latest), ckpt.load_state(latest)
    assert meta["step"] >= 2 and meta["policy_version"] == meta["step"]

    server = start_server(build_learner, config)  # autostart off: inspect the resumed state first
    learner = server.learner
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        status = learner_pb2_grpc.LearnerServiceStub(channel).GetStatus(
            learner_pb2.GetStatusRequest(), timeout=5, metadata=auth(internal_token)).status
    assert (status.step, status.policy_version) == (meta["step"], meta["policy_version"])
    _assert_same(learner.trainer.optimizer.state_dict(), saved["trainer"]["optimizer"], "optimizer")
    _assert_same(learner.trainer.kl_ctl.state_dict(), saved["trainer"]["kl_ctl"], "kl_ctl")
    _assert_same(learner.prompt_source.state_dict(), saved["prompts"], "prompts")
    _assert_same(dict(learner.model.policy.state_dict()), ckpt.load_policy_weights(latest), "policy")
    _assert_same(learner.model.value_head.state_dict(), saved["value_head"], "value_head")

    # The killed process may have pushed a version past its last checkpoint: the resumed learner
    # jumps past whatever the generator serves, so versions never repeat.
    served = _generator_policy(generator.port, internal_token)
    learner.run_step()
    assert learner.status().step == meta["step"] + 1
    assert learner.status().policy_version > max(served, meta["policy_version"])
    assert _generator_policy(generator.port, internal_token) == learner.status().policy_version
