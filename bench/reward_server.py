"""Reward server overhead: rule-only Score requests/s through the asyncio reward server (ours, what
``flywheel serve reward`` runs) vs the same RewardService core behind the thread-pool gRPC server
(``ServiceServer``, which the reward service used before), 32 concurrent callers, one sample each.

A rule-only scorer set (a length penalty, no model) leaves nothing to measure but the server: the
per-request cost a reward model's batches, or a GPU's, never hide. Both servers run the same
interceptors (auth, RPC metrics), validation, normalisation and metrics; each is its own process,
driven by the load of ``bench.reward_batching`` (32 coroutines on one grpc.aio channel). Runs
alternate between the two and each side's median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import grpc

from bench._common import report, terminate
from bench.reward_batching import measure
from flywheel.common.auth import new_secret
from flywheel.common.health import free_port, wait_serving

SCORERS = {"default": [{"name": "brevity", "kind": "length_penalty", "params": {"target_chars": 40}}]}
KINDS = ("asyncio", "threads")


# --- the servers (run as ``python -m bench.reward_server --serve KIND ...``) --------------------
def _threaded_server(config: Any) -> Any:
    """The reward core's Score on the thread-pool ``ServiceServer``: the handler blocks in its pool
    thread (``RewardService.score``), as the reward service's handlers did before asyncio."""
    from flywheel.common.server import ServiceServer
    from flywheel.reward.core import InvalidRequest, RewardService
    from flywheel.reward.metrics import RewardMetrics
    from flywheel.reward.scorers import Sample
    from flywheel.reward.servicer import SERVICE_NAME, _score_response
    from flywheel.v1 import reward_pb2

    server = ServiceServer("reward", config, [SERVICE_NAME])
    core = RewardService(config, RewardMetrics(server.registry, config.max_batch_size))

    def score(request: Any, context: grpc.ServicerContext) -> Any:
        samples = [Sample(s.sample_id, s.prompt, s.completion) for s in request.samples]
        try:
            return _score_response(core.score(samples, request.scorer))
        except InvalidRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    handler = grpc.unary_unary_rpc_method_handler(
        score,
        request_deserializer=reward_pb2.ScoreRequest.FromString,
        response_serializer=reward_pb2.ScoreResponse.SerializeToString,
    )
    server.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Score": handler}),))
    server.on_load(core.load)
    return server


def serve(kind: str, port: int, metrics_port: int, token: str) -> None:
    from flywheel.common.server import run_service
    from flywheel.reward.config import RewardConfig
    from flywheel.reward.server import build_server

    with tempfile.TemporaryDirectory(prefix="reward-server-bench-") as data_dir:
        config = RewardConfig(model="", scorers=SCORERS, port=port, metrics_port=metrics_port, host="127.0.0.1",
                              internal_token=token, data_dir=data_dir, log_level="WARNING")  # fmt: skip
        run_service(build_server(config) if kind == "asyncio" else _threaded_server(config))


@contextmanager
def server_process(kind: str, token: str) -> Iterator[tuple[str, str]]:
    """One server of ``kind`` in its own process until the block exits; yields (address, /metrics URL)."""
    port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "bench.reward_server", "--serve", kind, "--port", str(port),
               "--metrics-port", str(metrics_port)]  # fmt: skip
    env = {**os.environ, "REWARD_SERVER_BENCH_TOKEN": token}  # not on the command line, where ps shows it
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address, timeout=120.0, alive=lambda: proc.poll() is None)
        yield address, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        terminate(proc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs: finishes in about half a minute")
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)  # the server processes
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--metrics-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.metrics_port, os.environ["REWARD_SERVER_BENCH_TOKEN"])
        return
    seconds, repeats = (4.0, 3) if args.quick else (10.0, 5)
    load_before = os.getloadavg()
    token = new_secret()
    runs: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with ExitStack() as stack:
        servers = {kind: stack.enter_context(server_process(kind, token)) for kind in KINDS}
        for _ in range(repeats):
            for kind in reversed(KINDS):  # baseline first in each round
                runs[kind].append(measure(*servers[kind], token, seconds).samples_per_s)
    load_after = os.getloadavg()
    ours, baseline = (statistics.median(runs[kind]) for kind in KINDS)
    rows = [
        (f"{kind} server", f"{statistics.median(runs[kind]):.0f} requests/s",
         f"median of {repeats} x {seconds:.0f}s ({', '.join(f'{r:.0f}' for r in runs[kind])})")
        for kind in KINDS
    ]  # fmt: skip
    rows += [
        ("ratio", f"{ours / baseline:.2f}x", "asyncio / thread pool, 32 requests in flight, 1 sample each"),
        ("setup", "rule-only scorer set", f"{json.dumps(SCORERS['default'][0])}; {os.cpu_count()} CPUs, load "
                                          f"average {load_before[0]:.2f} before, {load_after[0]:.2f} after"),
    ]  # fmt: skip
    report("reward_server", rows, ours, baseline, 1.0, "requests/s")


if __name__ == "__main__":
    main()
