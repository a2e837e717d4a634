"""Reward dynamic batching: 32 concurrent callers scoring one sample per request through the real
gRPC reward server, dynamic batching (max_batch_size=32) vs one-at-a-time scoring
(max_batch_size=1): same model, same server settings otherwise, same requests, same run.

Each mode is its own ``flywheel serve reward`` process, as deployed, so the load generator does
not share a GIL with the server. The load is 32 coroutines on one grpc.aio channel, each sending
single-sample Score requests back to back: 32 requests always in flight, without 32 Python threads
contending for the bench process's GIL. Runs alternate between the two servers and each mode's
median is reported, so drift on a shared machine hits both alike.

The model ceiling row is what batching could give at most on this machine: the reward model's own
forward pass at batch 1 and batch 32, called directly (no gRPC, no tokenizer), 32 x t(1) / t(32).
The scoring ceiling row is the same for the whole of what one batch costs the service (chat
template, tokenizer, forward, read-back: ``RewardModel.score_batch``), still without gRPC: no
server can give more than that.
"model busy" is the share of a run the server's model spent in batches: near 100% the model is the
bottleneck; well below, the per-request gRPC work is.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench._common import report, terminate
from flywheel.common.auth import new_secret
from flywheel.common.health import free_port, wait_serving
from flywheel.common.tiny_models import TinySpec, corpus, tiny_model_path
from flywheel.v1 import reward_pb2, reward_pb2_grpc

CALLERS = 32
MAX_WAIT_MS = 5.0
# One math thread in both modes: on these shared 2-core machines a second intra-op thread waits on
# a core another process holds, which made batch-32 forwards ~10x slower than single-threaded.
TORCH_THREADS = 1
MAX_LENGTH_TOKENS = 128
# ``--model large``: a wider, deeper reward model (hidden 256, 4 layers), for context.
LARGE_SPEC = TinySpec(hidden_size=256, num_hidden_layers=4)


@dataclass(frozen=True)
class Run:
    samples_per_s: float
    mean_batch: float
    batch_ms: float
    """Mean model time per batch (tokenizer + forward), from the server's histogram."""
    model_busy: float
    """Share of the run the model was busy: near 1 means the model is the bottleneck."""
    latency_ms: float


# --- the reward server, as its own process ------------------------------------------------------
def _start_server(model: str, max_batch_size: int, data_dir: Path, token: str, log: IO[bytes],
                  device: str = "cpu") -> tuple[subprocess.Popen[bytes], int, int]:
    """Starts ``flywheel serve reward`` on free ports; (process, gRPC port, metrics port)."""
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_") or k == "FLYWHEEL_CACHE_DIR"}
    settings = {
        "PORT": port, "METRICS_PORT": metrics_port, "MODEL": model, "MAX_BATCH_SIZE": max_batch_size,
        "MAX_WAIT_MS": MAX_WAIT_MS, "TORCH_THREADS": TORCH_THREADS, "MAX_LENGTH_TOKENS": MAX_LENGTH_TOKENS,
        "MAX_WORKERS": CALLERS + 4, "INTERNAL_TOKEN": token, "DATA_DIR": data_dir, "LOG_LEVEL": "WARNING",
        "DEVICE": device,
    }  # fmt: skip
    env.update({f"FLYWHEEL_REWARD_{k}": str(v) for k, v in settings.items()})
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "serve", "reward"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    return proc, port, metrics_port


@contextmanager
def reward_server(model: str, max_batch_size: int, data_dir: Path, token: str,
                  device: str = "cpu") -> Iterator[tuple[str, str]]:
    """Runs ``flywheel serve reward`` until the block exits (SIGTERM, then wait); yields the gRPC
    address and the /metrics URL. A free port can be taken by another process before the server
    binds it (this machine is shared): then it starts again on new ports, a few times at most."""
    log_path = data_dir / f"reward-{max_batch_size}.log"
    with open(log_path, "wb") as log:
        proc: subprocess.Popen[bytes] | None = None
        try:
            for attempt in range(3):
                proc, port, metrics_port = _start_server(model, max_batch_size, data_dir, token, log, device)
                address = f"127.0.0.1:{port}"
                try:
                    wait_serving(address, timeout=180.0, alive=lambda p=proc: p.poll() is None)
                    break
                except RuntimeError:  # it exited: most likely a port was taken meanwhile
                    if attempt == 2:
                        sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
                        raise
            yield address, f"http://127.0.0.1:{metrics_port}/metrics"
        finally:
            if proc is not None:
                terminate(proc)


def batch_counters(metrics_url: str) -> tuple[float, float, float]:
    """(batches, samples, model seconds) the server has run so far, from its batch histograms."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return (
        values.get("flywheel_reward_batch_size_samples_count", 0.0),
        values.get("flywheel_reward_batch_size_samples_sum", 0.0),
        values.get("flywheel_reward_batch_duration_seconds_sum", 0.0),
    )


# --- the load -----------------------------------------------------------------------------------
def score_requests(n: int) -> list[reward_pb2.ScoreRequest]:
    lines = corpus(3 * n, seed=7)
    samples = [
        reward_pb2.ScoreSample(
            sample_id=str(i),
            prompt=f"How was {lines[3 * i][:12]}?",
            completion=f"{lines[3 * i + 1]} {lines[3 * i + 2]}",
        )
        for i in range(n)
    ]
    return [reward_pb2.ScoreRequest(samples=[s]) for s in samples]


async def _drive(address: str, metrics_url: str, token: str, seconds: float) -> Run:
    """CALLERS coroutines sending single-sample requests back to back for ``seconds``."""
    requests = score_requests(256)
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        for r in requests[:CALLERS]:  # warm-up: connection, first batches, allocator
            await stub.Score(r, metadata=metadata, timeout=60)
        done, latency = [0] * CALLERS, [0.0] * CALLERS
        before = batch_counters(metrics_url)  # nothing else runs on the loop yet: blocking is fine
        stop_at = time.perf_counter() + seconds

        async def caller(i: int) -> None:
            k = i
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await stub.Score(requests[k % len(requests)], metadata=metadata, timeout=120)
                latency[i] += time.perf_counter() - t0
                done[i] += 1
                k += CALLERS

        start = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(CALLERS)))
        elapsed = time.perf_counter() - start
        after = batch_counters(metrics_url)
    batches, samples, model_s = (a - b for a, b in zip(after, before, strict=True))
    total = sum(done)
    return Run(total / elapsed, samples / max(batches, 1.0), 1000 * model_s / max(batches, 1.0),
               model_s / elapsed, 1000 * sum(latency) / max(total, 1))  # fmt: skip


def measure(address: str, metrics_url: str, token: str, seconds: float) -> Run:
    return asyncio.run(_drive(address, metrics_url, token, seconds))


# --- the model's own ceiling --------------------------------------------------------------------
def model_ceiling(model: str, repeats: int, device: str = "cpu") -> tuple[tuple[float, float, float], ...]:
    """(ceiling, batch-1 seconds, batch-CALLERS seconds) for direct forward calls on the same model,
    then the same for whole ``score_batch`` calls; alternated, the ceiling is the median of each
    adjacent pair's CALLERS x t(1) / t(CALLERS), so a burst of load from other processes skews one
    pair, not the ratio."""
    import torch

    from flywheel.reward.model_scorer import RewardModel

    rm = RewardModel(model, device, "float32", MAX_LENGTH_TOKENS, TORCH_THREADS)
    rm.load()
    pairs = [(s.samples[0].prompt, s.samples[0].completion) for s in score_requests(CALLERS)]
    one, full = ({k: v.to(device) for k, v in rm._encode(b).items()} for b in (pairs[:1], pairs))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    calls = {
        "forward": (lambda: rm._model(**one), lambda: rm._model(**full)),
        "score_batch": (lambda: rm.score_batch(pairs[:1]), lambda: rm.score_batch(pairs)),
    }
    results = []
    for first, whole in calls.values():
        t1: list[float] = []
        t32: list[float] = []
        with torch.inference_mode():
            for i in range(repeats + 3):
                for times, call in ((t1, first), (t32, whole)):
                    t0 = time.perf_counter()
                    call()
                    sync()  # a CUDA forward returns before it has run
                    if i >= 3:  # the first rounds warm up
                        times.append(time.perf_counter() - t0)
        ratios = [CALLERS * a / b for a, b in zip(t1, t32, strict=True)]
        results.append((statistics.median(ratios), statistics.median(t1), statistics.median(t32)))
    return tuple(results)


def _model_id(name: str) -> str:
    return str(tiny_model_path("reward", LARGE_SPEC)) if name == "large" else name


def _mode_row(label: str, runs: list[Run], seconds: float) -> tuple[str, str, str]:
    med = statistics.median
    return (
        label,
        f"{med(r.samples_per_s for r in runs):.0f} samples/s",
        f"median of {len(runs)} x {seconds:.0f}s ({', '.join(f'{r.samples_per_s:.0f}' for r in runs)}); "
        f"mean batch {med(r.mean_batch for r in runs):.1f}, {med(r.batch_ms for r in runs):.1f} ms/batch, "
        f"model busy {med(r.model_busy for r in runs):.0%}, latency {med(r.latency_ms for r in runs):.0f} ms",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs: finishes in about a minute")
    parser.add_argument("--device", default="cpu", help="where the reward model runs: cpu, cuda or cuda:N")
    parser.add_argument("--model", default="tiny://reward",
                        help="reward model: tiny://reward (the service default), 'large' (hidden 256, "
                             "4 layers), or a hub id / path")  # fmt: skip
    args = parser.parse_args(argv)
    seconds, repeats = (6.0, 3) if args.quick else (15.0, 5)
    model = _model_id(args.model)
    load_before = os.getloadavg()
    (ceiling, t1, t32), (scoring, s1, s32) = model_ceiling(model, 30 if args.quick else 100, args.device)
    token = new_secret()
    runs: dict[int, list[Run]] = {CALLERS: [], 1: []}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        # Both servers stay up (an idle one costs nothing); runs alternate, baseline first.
        servers = {n: stack.enter_context(reward_server(model, n, Path(tmp), token, args.device))
                   for n in (1, CALLERS)}
        for _ in range(repeats):
            for n in (1, CALLERS):
                runs[n].append(measure(*servers[n], token, seconds))
    load_after = os.getloadavg()
    ours = statistics.median(r.samples_per_s for r in runs[CALLERS])
    baseline = statistics.median(r.samples_per_s for r in runs[1])
    rows = [
        _mode_row(f"dynamic batching (max_batch_size={CALLERS})", runs[CALLERS], seconds),
        _mode_row("one at a time (max_batch_size=1)", runs[1], seconds),
        ("ratio", f"{ours / baseline:.2f}x", f"{CALLERS} requests in flight, 1 sample each, target 5x"),
        ("model ceiling", f"{ceiling:.2f}x",
         f"direct forward (no gRPC, no tokenizer): batch 1 {1000 * t1:.2f} ms, "
         f"batch {CALLERS} {1000 * t32:.2f} ms; the service reaches {ours / baseline / ceiling:.0%} of it"),
        ("scoring ceiling", f"{scoring:.2f}x",
         f"direct score_batch (chat template, tokenizer, forward; no gRPC): batch 1 {1000 * s1:.2f} ms, "
         f"batch {CALLERS} {1000 * s32:.2f} ms; the service reaches {ours / baseline / scoring:.0%} of it"),
        ("setup", f"{args.model} on {args.device}",
         f"max_wait_ms={MAX_WAIT_MS:g}, torch_threads={TORCH_THREADS}, {os.cpu_count()} CPUs, "
         f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"),
    ]  # fmt: skip
    report("reward_batching", rows, ours, baseline, 5.0, "samples/s")


if __name__ == "__main__":
    main()
