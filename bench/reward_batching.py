"""Reward dynamic batching: 32 concurrent callers scoring one sample per request through the real
gRPC reward server, dynamic batching (max_batch_size=32) vs one-at-a-time scoring
(max_batch_size=1): same model, same requests, same run. Prints samples/s for both and the ratio.

The reward model is a Llama seq-cls built locally, larger than the test model (hidden 256,
4 layers) so that a model forward, not gRPC plumbing, is what batching amortises.
"""

from __future__ import annotations

import tempfile
import threading
import time

import grpc

from bench._common import parse, report
from flywheel.common.auth import new_secret
from flywheel.common.tiny_models import TinySpec, corpus, tiny_model_path
from flywheel.reward.config import RewardConfig
from flywheel.reward.server import build_server
from flywheel.v1 import reward_pb2, reward_pb2_grpc

CALLERS = 32
SPEC = TinySpec(hidden_size=256, num_hidden_layers=4)
# One math thread for both modes: on these shared 2-core machines a second intra-op thread waits
# on a core another process holds, which made batch-32 forwards ~10x slower than single-threaded.
TORCH_THREADS = 1


def _requests(n: int) -> list[reward_pb2.ScoreRequest]:
    lines = corpus(3 * n, seed=7)
    samples = [
        reward_pb2.ScoreSample(
            sample_id=str(i), prompt=f"How was {lines[3 * i][:12]}?", completion=f"{lines[3 * i + 1]} {lines[3 * i + 2]}"
        )
        for i in range(n)
    ]
    return [reward_pb2.ScoreRequest(samples=[s]) for s in samples]


def run(model: str, max_batch_size: int, seconds: float, data_dir: str) -> tuple[float, float, float]:
    """(samples/s, mean model batch size, mean request latency in ms) with CALLERS threads sending
    single-sample Score requests back to back for ``seconds``."""
    token = new_secret()
    config = RewardConfig(
        model=model, port=0, metrics_port=-1, internal_token=token, data_dir=data_dir, redis_url="",
        max_batch_size=max_batch_size, max_wait_ms=5.0, max_workers=CALLERS + 4, max_length_tokens=128,
        torch_threads=TORCH_THREADS,
    )  # fmt: skip
    server = build_server(config)
    server.start()
    server.load()
    server.set_ready()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    metadata = [("authorization", f"Bearer {token}")]
    requests = _requests(64)
    for r in requests[:4]:
        stub.Score(r, metadata=metadata, timeout=60)  # warm-up
    before_batches = server.registry.get_sample_value("flywheel_reward_batch_size_samples_count") or 0.0
    before_samples = server.registry.get_sample_value("flywheel_reward_batch_size_samples_sum") or 0.0
    done = [0] * CALLERS
    latency = [0.0] * CALLERS
    stop_at = time.perf_counter() + seconds

    def caller(i: int) -> None:
        k = i
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            stub.Score(requests[k % len(requests)], metadata=metadata, timeout=120)
            latency[i] += time.perf_counter() - t0
            done[i] += 1
            k += CALLERS

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    batches = (server.registry.get_sample_value("flywheel_reward_batch_size_samples_count") or 0.0) - before_batches
    samples = (server.registry.get_sample_value("flywheel_reward_batch_size_samples_sum") or 0.0) - before_samples
    channel.close()
    server.stop(0)
    total = sum(done)
    return total / elapsed, samples / max(batches, 1.0), 1000 * sum(latency) / max(total, 1)


def main() -> None:
    args = parse(__doc__ or "")
    seconds = 10.0 if args.quick else 30.0
    model = str(tiny_model_path("reward", SPEC))
    with tempfile.TemporaryDirectory() as data_dir:
        # Baseline first, ours second, then baseline again: drift on a shared machine shows up.
        base_a = run(model, 1, seconds / 2, data_dir)
        ours = run(model, CALLERS, seconds, data_dir)
        base_b = run(model, 1, seconds / 2, data_dir)
    baseline = (base_a[0] + base_b[0]) / 2
    rows = [
        ("dynamic batching (max_batch_size=32)", f"{ours[0]:.1f} samples/s",
         f"mean batch {ours[1]:.1f}, mean latency {ours[2]:.1f} ms"),
        ("one at a time (max_batch_size=1), before", f"{base_a[0]:.1f} samples/s",
         f"mean batch {base_a[1]:.1f}, mean latency {base_a[2]:.1f} ms"),
        ("one at a time (max_batch_size=1), after", f"{base_b[0]:.1f} samples/s",
         f"mean batch {base_b[1]:.1f}, mean latency {base_b[2]:.1f} ms"),
        ("ratio", f"{ours[0] / baseline:.2f}x", f"{CALLERS} callers, 1 sample/request, torch_threads={TORCH_THREADS}, target >= 5x"),
    ]  # fmt: skip
    report("reward_batching", rows, ours[0], baseline, 5.0, "samples/s")


if __name__ == "__main__":
    main()
