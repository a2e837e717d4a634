"""Async vs sync learner on the same task and budget: samples/s and final reward of each, and the ratio.

Task: steer the SFT'd tiny Llama toward positive sentiment (VADER reward), as bench/ppo_learning.py,
but with the real services: the generator and the reward server run as subprocesses pinned to core 1
(``taskset -c 1``), the learner loop runs in this process pinned to core 0 (``sched_setaffinity``),
one torch thread each, so the comparison measures the overlap of generation with training rather
than two phases fighting for the same two cores (in production they are on separate GPUs).

Budget: the same number of PPO steps (64 samples, 1 epoch) for both modes, after a warm-up step that is
not timed; samples/s = samples trained / wall seconds of the timed steps. Each mode gets fresh
servers (version 0, same SFT weights); every seed runs both modes, alternating which goes first (sync,
async, async, sync, ...) so load drifts hit both. Several seeds, because one RL run is a noisy sample
of its outcome: async's trajectory also depends on timing (a push can land between the generator's
internal batches of one request, so some samples come from the newer version), and at this learning
rate single runs of either mode end anywhere in a wide band. Final reward: mean VADER reward of the
served policy on held-out prompts (fixed seed per run seed), and the pre-RL value as a reference;
reported per mode as the mean over seeds, with the mean paired difference (async - sync, same seed)
and its standard error. Target: async >= 1.5x samples/s with a final reward no worse than sync
(within the noise of the eval).

    python -m bench.async_vs_sync [--quick]
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from bench._common import parse, terminate
from bench.ppo_learning import sft_model
from flywheel.common.auth import new_secret
from flywheel.common.health import free_port, wait_serving
from flywheel.common.redis_store import EmbeddedRedis, connect
from flywheel.learner.config import LearnerConfig
from flywheel.learner.core import Learner
from flywheel.learner.guard import evaluate_served_policy
from flywheel.learner.metrics import LearnerMetrics
from flywheel.learner.prompts import PromptItem, builtin_sentiment_prompts
from flywheel.learner.publish import PolicyPublisher
from flywheel.learner.rollout import GrpcRollouts

VADER = {"default": [{"name": "sentiment", "kind": "vader"}]}
LEARNER_CORE, SERVICE_CORE = 0, 1
EVAL_PROMPTS = 32
# 5e-4, not bench/ppo_learning's 1e-3: at 1e-3 one update moves this tiny policy by 2-6 nats per
# completion (the behaviour-vs-proximal KL async measures), far outside the regime of real RLHF
# runs (well under a nat per step), where one version of lag costs little; measured at 1e-3 over
# 6 seeds, async ended 0.15 +- 0.07 below sync. Both modes use the same rate.
LEARNING_RATE = 5e-4


def _serve(service: str, fields: dict[str, Any], tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Starts `flywheel serve SERVICE` pinned to SERVICE_CORE with one torch thread; waits for SERVING."""
    port = free_port()
    config = tmp / f"{service}-{port}.yaml"
    config.write_text(yaml.safe_dump({**fields, "host": "127.0.0.1", "port": port, "metrics_port": -1}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(tmp / f"{service}-{port}.log", "wb")  # noqa: SIM115  # the child writes it until it exits
    proc = subprocess.Popen(["taskset", "-c", str(SERVICE_CORE), sys.executable, "-m", "flywheel.cli", "serve",
                             service, "-c", str(config)], env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    wait_serving(address, 180, alive=lambda: proc.poll() is None)
    return proc, address


def _eval_prompts() -> list[PromptItem]:
    return [PromptItem(f"eval-{i}", text=t) for i, t in enumerate(builtin_sentiment_prompts()[1::2][:EVAL_PROMPTS])]


def run_mode(mode: str, steps: int, model: str, common: dict[str, Any], tmp: Path, seed: int = 0) -> dict[str, float]:
    """Fresh generator + reward, a learner in ``mode``; times ``steps`` steps after a warm-up one."""
    connect(common["redis_url"]).flushdb()
    generator, gen_address = _serve("generator", {**common, "model": model}, tmp)
    reward, reward_address = _serve("reward", {**common, "model": "", "scorers": VADER}, tmp)
    try:
        config = LearnerConfig(
            **common, policy_model=model, generator_targets=(gen_address,), reward_target=reward_address,
            checkpoint_dir=str(tmp / f"ckpt-{mode}-{seed}"), run_dir=str(tmp / f"run-{mode}-{seed}"),
            prompts_file="builtin://sentiment",
            prompts_per_step=16, samples_per_prompt=4, minibatch_size=32, ppo_epochs=1, max_new_tokens=32,
            learning_rate=LEARNING_RATE, init_kl_coef=0.02, checkpoint_every=0, mode=mode, max_policy_lag=1, seed=seed,
        )
        torch.manual_seed(seed)
        learner = Learner(config, LearnerMetrics(CollectorRegistry()), connect(common["redis_url"]))
        learner.load()
        learner.rollouts = GrpcRollouts(config, threading.Event(), learner.on_wait)
        learner.publisher = PolicyPublisher(config, learner.redis)
        pad = learner.tokenizer.pad_token_id  # type: ignore[attr-defined]
        before = evaluate_served_policy(learner.rollouts, learner.reference, _eval_prompts(), config, pad or 0)
        learner.run_step()  # warm-up: connections, first full push
        start, samples, records = time.perf_counter(), 0, []
        for i in range(steps):
            metrics = learner.run_step()
            samples += config.batch_size
            records.append(metrics)
            print(f"  {mode} step {i + 1}/{steps}: reward {metrics['reward_mean']:+.3f} "
                  f"({metrics['seconds_total']:.2f}s)", flush=True)
        seconds = time.perf_counter() - start
        after = evaluate_served_policy(learner.rollouts, learner.reference, _eval_prompts(), config, pad or 0)
        learner.close(timeout=30)
        mean = lambda key: sum(r.get(key, 0.0) for r in records) / len(records)  # noqa: E731
        return {"samples_per_second": samples / seconds, "seconds": seconds, "eval_reward_before": before.reward,
                "eval_reward": after.reward, "eval_kl": after.kl, "generate_wait": mean("seconds_generate"),
                "train": mean("seconds_train"), "push": mean("seconds_push"),
                "staleness_mean": mean("staleness_mean"), "rollout_generate": mean("seconds_rollout_generate"),
                "tokens_per_sample": mean("completion_tokens_mean"),
                "tokens_per_second": samples / seconds * mean("completion_tokens_mean")}
    finally:
        terminate(generator)
        terminate(reward)


def _combine(runs: list[dict[str, float]]) -> dict[str, float]:
    """Several runs of one mode: samples/s over their total time, means of the rest."""
    out = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
    out["seconds"] = sum(r["seconds"] for r in runs)
    out["samples_per_second"] = len(runs) / sum(1 / r["samples_per_second"] for r in runs)  # same samples each
    return out


def main() -> None:
    args = parse(__doc__ or "")
    # --quick keeps the budget (50 steps: over the first ~20 the two policies' completion lengths,
    # hence the work per sample, differ most) and runs fewer seeds.
    steps = 50
    seeds = (0, 1) if args.quick else (0, 1, 2, 3, 4, 5)
    order = [(mode, seed) for i, seed in enumerate(seeds)
             for mode in (("sync", "async") if i % 2 == 0 else ("async", "sync"))]  # ABBA: drifts hit both
    os.sched_setaffinity(0, {LEARNER_CORE})
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    model = str(sft_model())
    tmp = Path(tempfile.mkdtemp(prefix="async-vs-sync-"))
    atexit.register(shutil.rmtree, tmp, True)  # checkpoints and snapshots: nothing left in /tmp
    with EmbeddedRedis(tmp / "redis") as redis_server:
        common = dict(internal_token=new_secret(), redis_url=redis_server.url, data_dir=str(tmp), grace_seconds=1.0)
        runs = [(mode, seed, run_mode(mode, steps, model, common, tmp, seed)) for mode, seed in order]
    load_end = os.getloadavg()
    sync, asy = (_combine([r for m, _, r in runs if m == mode]) for mode in ("sync", "async"))
    final = {(m, seed): r["eval_reward"] for m, seed, r in runs}
    diffs = [final["async", seed] - final["sync", seed] for seed in seeds]
    diff_mean = statistics.mean(diffs)
    diff_se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    ratio = asy["samples_per_second"] / sync["samples_per_second"]
    table = Table(title="async_vs_sync")
    for column in ("measure", "sync", "async", "note"):
        table.add_column(column)
    rows = [
        ("samples/s", "samples_per_second", ".2f",
         f"{steps} timed steps x 64 samples after 1 warm-up, seeds {list(seeds)} "
         f"(order {'/'.join(f'{m}{seed}' for m, seed in order)})"),
        ("wall seconds", "seconds", ".1f", ""),
        ("completion tokens / sample", "tokens_per_sample", ".2f",
         "what each mode's policy generates: more tokens = more work per sample"),
        ("completion tokens/s", "tokens_per_second", ".0f", "work done per second, whatever the lengths"),
        ("learner waits for rollouts (s/step)", "generate_wait", ".3f", "async: what training did not hide"),
        ("train (s/step)", "train", ".3f", "learner core 0"),
        ("push (s/step)", "push", ".3f", "sync: delta PushWeights; async: hand-over (pushed in background)"),
        ("rollout generate (s/batch)", "rollout_generate", ".3f", "async rollout thread; services on core 1"),
        ("sample staleness (versions, mean)", "staleness_mean", ".2f", "max_policy_lag=1, drop"),
        ("eval reward pre-RL", "eval_reward_before", "+.3f", f"{EVAL_PROMPTS} held-out prompts x 4, fixed seed"),
        ("eval reward final (mean)", "eval_reward", "+.3f", "VADER compound in [-1, 1]"),
        ("eval KL to reference", "eval_kl", ".3f", ""),
    ]
    for label, key, fmt, note in rows:
        table.add_row(label, format(sync[key], fmt), format(asy[key], fmt), note)
    table.add_row("eval reward final, per seed", " ".join(f"{final['sync', s]:+.2f}" for s in seeds),
                  " ".join(f"{final['async', s]:+.2f}" for s in seeds),
                  f"async - sync, paired by seed: {diff_mean:+.3f} (standard error {diff_se:.3f})")
    Console().print(table)
    print(f"load average (1/5/15 min): start {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}, "
          f"end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f} on {os.cpu_count()} cores "
          f"(a shared machine: high load skews both modes)")
    summary = {"name": "async_vs_sync", "ours": round(asy["samples_per_second"], 3),
               "baseline": round(sync["samples_per_second"], 3), "ratio": round(ratio, 3), "target": 1.5,
               "unit": "samples/s, async / sync (same steps)", "final_reward_async": round(asy["eval_reward"], 4),
               "final_reward_sync": round(sync["eval_reward"], 4), "final_reward_diff": round(diff_mean, 4),
               "final_reward_diff_se": round(diff_se, 4), "seeds": len(seeds),
               "tokens_per_s_ratio": round(asy["tokens_per_second"] / sync["tokens_per_second"], 3)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
