"""What do remote rollouts cost? The same PPO step (generate -> score -> train) with rollouts over gRPC
(real generator and reward servers in this process, on loopback) vs in-process (calling the same
generator engine and reward scorer objects directly).

Both runs start from the same SFT'd tiny model with the same seeds; after every step the generator
gets the new weights (gRPC: a delta PushWeights; in-process: a tensor copy into the engine), so both
sample from the same policy. The ratio compares the mean wall time of generate + score + train per
step (weight transfer reported separately: bench/weight_push.py measures it). Target: <= 1.15x.

    python -m bench.rollout_overhead [--quick]
"""

from __future__ import annotations

import atexit
import shutil
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from rich.progress import Progress

from bench._common import parse, report
from bench.ppo_learning import sft_model
from flywheel.common.auth import new_secret
from flywheel.common.redis_store import EmbeddedRedis, connect
from flywheel.generator.config import GeneratorConfig
from flywheel.generator.engine import Cancellation, Sampling
from flywheel.generator.server import build_server as build_generator
from flywheel.learner.config import LearnerConfig
from flywheel.learner.core import Learner
from flywheel.learner.metrics import LearnerMetrics
from flywheel.learner.prompts import PromptItem
from flywheel.learner.publish import PolicyPublisher
from flywheel.learner.rollout import GeneratedBatch, GrpcRollouts
from flywheel.reward.config import RewardConfig
from flywheel.reward.core import RewardService
from flywheel.reward.scorers import Sample
from flywheel.reward.server import build_server as build_reward

VADER = {"default": [{"name": "sentiment", "kind": "vader"}]}
PHASES = ("generate", "score", "train")


class EngineRollouts:
    """The in-process RolloutSource: the generator engine and reward core, no gRPC in between."""

    def __init__(self, engine: Any, reward_core: Any, config: LearnerConfig) -> None:
        self.engine, self.reward_core, self.config = engine, reward_core, config

    def generate(self, prompts: list[PromptItem], seed: int) -> GeneratedBatch:
        cfg = self.config
        ids = [self.engine.tokenize(text=p.text) for p in prompts]
        sampling = Sampling(n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens, seed=seed)
        results = self.engine.generate(ids, sampling, "", Cancellation())
        out = GeneratedBatch(list(prompts), [], [], [], [], [], [])
        for prompt_ids, completions in zip(ids, results, strict=True):
            for c in completions:
                out.prompt_ids.append(prompt_ids)
                out.completion_ids.append(list(c.token_ids))
                out.completion_texts.append(c.text)
                out.behaviour_logprobs.append(list(c.logprobs))
                out.truncated.append(c.finish_reason == "length")
                out.policy_versions.append(c.policy_version)
        return out

    def score(self, prompt_texts: list[str], completion_texts: list[str]) -> tuple[list[float], int]:
        samples = [Sample(str(i), p, c) for i, (p, c) in enumerate(zip(prompt_texts, completion_texts, strict=True))]
        result = self.reward_core.score(samples)
        return [s.reward for s in result.scores], int(result.model_version)


def _start(server: Any) -> Any:
    server.start()
    server.load()
    server.set_ready()
    return server


def _interleaved(remote: Learner, local: Learner, steps: int, copy_weights: Any) -> tuple[list, list]:
    """Alternates one remote and one local step, so drifts in machine load hit both alike. Before each
    step the engine gets that learner's weights (in place, between batches), so the remote learner's
    delta pushes apply to exactly the base they were computed against."""
    records: tuple[list[dict[str, float]], list[dict[str, float]]] = ([], [])
    with Progress() as progress:
        task = progress.add_task("gRPC / in-process steps", total=steps + 1)
        for i in range(steps + 1):  # the first step of each warms up and is not counted
            copy_weights(remote)  # the engine serves each learner's own current weights
            remote_metrics = remote.run_step()
            copy_weights(local)
            local_metrics = local.run_step()
            if i:
                records[0].append(remote_metrics)
                records[1].append(local_metrics)
            progress.update(task, advance=1)
    return records


def main() -> None:
    args = parse(__doc__ or "")
    steps = 15 if args.quick else 40
    model = str(sft_model())
    tmp = Path(tempfile.mkdtemp(prefix="rollout-overhead-"))
    atexit.register(shutil.rmtree, tmp, True)  # checkpoints and snapshots: nothing left in /tmp
    token = new_secret()
    with EmbeddedRedis(tmp / "redis") as redis_server:
        common = dict(internal_token=token, redis_url=redis_server.url, data_dir=str(tmp), metrics_port=-1,
                      grace_seconds=1.0)
        generator = _start(build_generator(GeneratorConfig(**common, model=model)))
        reward = _start(build_reward(RewardConfig(**common, model="", scorers=VADER)))
        engine = generator.generator_servicer.engine
        fields: dict[str, Any] = dict(
            common, policy_model=model, generator_targets=(f"127.0.0.1:{generator.port}",),
            reward_target=f"127.0.0.1:{reward.port}", checkpoint_dir=str(tmp / "ckpt"), run_dir=str(tmp / "run"),
            prompts_file="builtin://sentiment", prompts_per_step=16, samples_per_prompt=4, minibatch_size=32,
            ppo_epochs=2, max_new_tokens=24, learning_rate=1e-3, checkpoint_every=0,
        )
        redis = connect(redis_server.url)
        reward_core = RewardService(RewardConfig(**common, model="", scorers=VADER))  # same scorer, no server
        reward_core.load()
        try:
            remote_learner, local_learner = _learners(LearnerConfig(**fields), redis, engine, reward_core)
            remote, local = _interleaved(remote_learner, local_learner, steps, _copier(engine))
        finally:
            reward_core.close()
            redis.close()
            generator.stop(0)
            reward.stop(0)
    _report(remote, local, steps)


def _learners(config: LearnerConfig, redis: Any, engine: Any, reward_core: Any) -> tuple[Learner, Learner]:
    torch.manual_seed(0)
    remote = Learner(config, LearnerMetrics(CollectorRegistry()), redis)
    remote.load()
    remote.rollouts = GrpcRollouts(config, threading.Event(), remote.on_wait)
    remote.publisher = PolicyPublisher(config, redis)
    torch.manual_seed(0)
    local = Learner(config, LearnerMetrics(CollectorRegistry()))
    local.load()
    local.rollouts = EngineRollouts(engine, reward_core, config)
    return remote, local


def _copier(engine: Any) -> Any:
    live = engine.weights_for_push()

    @torch.no_grad()
    def copy_weights(learner: Learner) -> None:
        for name, tensor in learner.model.policy.state_dict().items():
            live[name].copy_(tensor)

    return copy_weights


def _report(remote: list[dict[str, float]], local: list[dict[str, float]], steps: int) -> None:
    def mean(records: list[dict[str, float]], phase: str) -> float:
        return statistics.fmean(r[f"seconds_{phase}"] for r in records)

    rollout_remote = sum(mean(remote, p) for p in PHASES)
    rollout_local = sum(mean(local, p) for p in PHASES)
    rows = [(f"{p} (s/step)", f"{mean(remote, p):.3f} vs {mean(local, p):.3f}", "gRPC vs in-process")
            for p in PHASES]
    rows += [
        ("generate+score+train (s/step)", f"{rollout_remote:.3f} vs {rollout_local:.3f}", f"mean of {steps} steps"),
        ("weight push (s/step, gRPC only)", f"{mean(remote, 'push'):.3f}", "delta PushWeights, not in the ratio"),
        ("reward mean, last step", f"{remote[-1]['reward_mean']:+.3f} vs {local[-1]['reward_mean']:+.3f}", ""),
    ]
    report("rollout_overhead", rows, ours=rollout_remote, baseline=rollout_local, target=1.15,
           unit="seconds per PPO step (generate+score+train), gRPC / in-process")


if __name__ == "__main__":
    main()
