"""Weight-push throughput: our PushWeights RPC with the TCP side channel (gRPC control, bytes over
a negotiated raw TCP connection, staged + verified by the real WeightReceiver, then swapped into a
live state dict) vs the same bytes over a raw loopback TCP socket. The pure gRPC-stream push is
an extra row.

The receiver is a receiver-only servicer (no model forward): a real gRPC server on a free port
whose PushWeights does exactly what the generator's does — ``weight_channel.receive_push`` into a
WeightReceiver (order, sizes, names, shapes, dtypes, xxh3_128 checksums, finite check), then
``weights.swap_in`` into the live tensors, as the transformers engine does (a whole CPU tensor
takes over the verified staging memory; anything else is copied into). Timed per push: channel
setup, the RPC with its negotiation, transfer, verification and the swap (encoding and sender
checksums happen once, untimed, as in ``push_weights``); the raw socket's timing starts at its
connect, its receive buffer allocated before. The first two pushes fault in fresh staging memory;
from then on staging recycles what the swaps replaced. Model: ~500 MB of random fp32/bf16 tensors,
in memory. --quick runs the same (about 15 s): at ~100 MB the fixed cost of an RPC (~4.5 ms) and
the two cold pushes among few rounds measured set-up rather than throughput.
Medians over interleaved rounds; the load average is printed (2 shared cores: it matters).
"""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import torch

from bench._common import parse, report
from flywheel.common.weight_channel import receive_push
from flywheel.common.weight_push import push_plan
from flywheel.common.weights import PushPlan, WeightPushError, WeightReceiver, encode_push, swap_in
from flywheel.v1 import common_pb2, generator_pb2, generator_pb2_grpc

MAX_MESSAGE = 16 * 1024 * 1024


def make_state(total_bytes: int) -> dict[str, torch.Tensor]:
    """Layer-like tensors (fp32 and bf16 halves) adding up to about ``total_bytes``."""
    state: dict[str, torch.Tensor] = {}
    hidden, i = 1024, 0
    while sum(t.numel() * t.element_size() for t in state.values()) < total_bytes:
        dtype = torch.float32 if i % 2 == 0 else torch.bfloat16
        state[f"layers.{i}.mlp.weight"] = torch.randn(4 * hidden, hidden).to(dtype)
        state[f"layers.{i}.norm.weight"] = torch.ones(hidden, dtype=dtype)
        i += 1
    return state


class ReceiverServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self, live: dict[str, torch.Tensor]) -> None:
        self.live = live
        self.version = 0

    def PushWeights(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        receiver = WeightReceiver(self.live, self.version, 1 << 40, side_channel=True)
        try:
            staged = receive_push(request_iterator, context, receiver, bind_host="127.0.0.1")
        except WeightPushError as exc:
            context.abort(grpc.StatusCode[exc.status], str(exc))
        swap_in(self.live, staged)  # as the transformers engine does
        self.version = staged.version
        result = common_pb2.WeightPushResult(version=staged.version, bytes_received=staged.bytes_received)
        return generator_pb2.GeneratorServicePushWeightsResponse(result=result)


def timed_push(plan: PushPlan, version: int, port: int, transport: str) -> float:
    plan.manifest.version = version
    start = time.perf_counter()
    result = push_plan(f"127.0.0.1:{port}", plan, token="", transport=transport, timeout=600,
                       max_message_bytes=MAX_MESSAGE)  # fmt: skip
    elapsed = time.perf_counter() - start
    assert result.version == version, result
    return elapsed


def tcp_push(state: dict[str, torch.Tensor]) -> float:
    """The baseline: the same tensor bytes through one loopback TCP connection into preallocated buffers."""
    payloads = [memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()) for t in state.values()]
    total = sum(p.nbytes for p in payloads)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = bytearray(total)

    def serve() -> None:
        conn, _ = listener.accept()
        view, got = memoryview(received), 0
        while got < total:
            n = conn.recv_into(view[got:], min(total - got, 1 << 22))
            if n == 0:
                break
            got += n
        conn.sendall(b"k")
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for payload in payloads:
            sock.sendall(payload)
        sock.recv(1)
    elapsed = time.perf_counter() - start
    thread.join()
    listener.close()
    return elapsed


def main(argv: list[str] | None = None) -> dict[str, object]:
    parse(__doc__ or "", argv)  # --help, and --quick (accepted: the run is short already)
    size = 500 * 10**6
    state = make_state(size)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    live = {k: torch.zeros_like(v) for k, v in state.items()}
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    servicer = ReceiverServicer(live)
    generator_pb2_grpc.add_GeneratorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    plan = encode_push(state, 1)  # once, like push_weights for N targets
    rounds = 5
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {"tcp": [], "grpc": [], "raw": []}
    version = 0
    for _ in range(rounds):  # interleaved, so load drift hits every path alike
        for transport in ("tcp", "grpc"):
            version += 1
            times[transport].append(timed_push(plan, version, port, transport))
        times["raw"].append(tcp_push(state))
    load_after = os.getloadavg()
    server.stop(0)
    assert all(torch.equal(live[k], state[k]) for k in state), "pushed weights differ"
    rate = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
    spread = {k: f"{nbytes / max(v) / 1e9:.2f}-{nbytes / min(v) / 1e9:.2f}" for k, v in times.items()}
    rows = [
        ("model bytes", f"{nbytes / 1e6:.0f} MB", f"{len(state)} tensors, fp32 + bf16; {rounds} rounds"),
        ("PushWeights, TCP side channel", f"{rate['tcp']:.2f} GB/s",
         f"ours; median (range {spread['tcp']}); negotiate+transfer+verify+swap"),
        ("PushWeights, gRPC stream", f"{rate['grpc']:.2f} GB/s",
         f"median (range {spread['grpc']}); transfer+verify+swap"),
        ("raw TCP (same bytes)", f"{rate['raw']:.2f} GB/s", f"baseline; median (range {spread['raw']}); no verification"),
        ("load average (1 min)", f"{load_before[0]:.2f} -> {load_after[0]:.2f}",
         f"{os.cpu_count()} CPUs; 5/15 min after: {load_after[1]:.2f}/{load_after[2]:.2f}"),
    ]  # fmt: skip
    return report("weight_push", rows, rate["tcp"], rate["raw"], target=0.7, unit="GB/s")


if __name__ == "__main__":
    main()
