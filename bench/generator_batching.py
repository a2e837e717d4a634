"""Dynamic batching: 16 concurrent callers through the real gRPC generator (tiny model, CPU),
max_batch_size=16 vs one request at a time (max_batch_size=1), same requests, same run."""

from __future__ import annotations

import tempfile
import threading
import time

import grpc

from bench._common import parse, report
from flywheel.common.auth import new_secret
from flywheel.common.tiny_models import tiny_model_path
from flywheel.generator.config import GeneratorConfig
from flywheel.generator.server import build_server
from flywheel.v1 import generator_pb2, generator_pb2_grpc

CALLERS = 16


def run(max_batch_size: int, requests_per_caller: int, max_new_tokens: int, data_dir: str) -> float:
    """Generated tokens per second with ``CALLERS`` threads each sending requests back to back."""
    token = new_secret()
    config = GeneratorConfig(
        model=str(tiny_model_path("llama")), port=0, metrics_port=-1, internal_token=token,
        data_dir=data_dir, max_batch_size=max_batch_size, max_wait_ms=5.0, max_workers=CALLERS + 4,
    )  # fmt: skip
    server = build_server(config)
    server.start()
    server.load()
    server.set_ready()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = generator_pb2_grpc.GeneratorServiceStub(channel)
    request = generator_pb2.GenerateRequest(
        prompts=[generator_pb2.Prompt(text="the movie was")],
        sampling=generator_pb2.SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=1),
        purpose=generator_pb2.REQUEST_PURPOSE_ROLLOUT,
    )
    metadata = [("authorization", f"Bearer {token}")]
    stub.Generate(request, metadata=metadata)  # warm-up
    tokens = [0] * CALLERS

    def caller(i: int) -> None:
        for _ in range(requests_per_caller):
            response = stub.Generate(request, metadata=metadata, timeout=600)
            tokens[i] += sum(len(c.token_ids) for r in response.results for c in r.completions)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    channel.close()
    server.stop(0)
    return sum(tokens) / elapsed


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse(__doc__ or "", argv)
    per_caller, new_tokens = (2, 16) if args.quick else (8, 32)
    with tempfile.TemporaryDirectory() as data_dir:
        batched = run(CALLERS, per_caller, new_tokens, data_dir)
        serial = run(1, per_caller, new_tokens, data_dir)
    rows = [
        ("callers x requests", f"{CALLERS} x {per_caller}", f"{new_tokens} new tokens each, tiny llama, CPU"),
        ("dynamic batching (max 16)", f"{batched:.0f} tok/s", "through gRPC"),
        ("one at a time (max 1)", f"{serial:.0f} tok/s", "same server, max_batch_size=1"),
    ]
    return report("generator_batching", rows, batched, serial, target=2.0, unit="tokens/s")


if __name__ == "__main__":
    main()
