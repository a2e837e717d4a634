"""Weight-push throughput: our PushWeights RPC (gRPC client stream, staged + verified by the real
WeightReceiver, then swapped into a live state dict) vs the same bytes over a raw loopback TCP socket.

The receiver is a receiver-only servicer (no model forward): a real gRPC server on a free port
whose PushWeights does exactly what the generator's does — WeightReceiver (order, sizes, names,
shapes, dtypes, xxh3_128 checksums, finite check) and an in-place copy into the live tensors.
Model: ~500 MB of random fp32/bf16 tensors (--quick: ~100 MB), in memory.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import torch

from bench._common import parse, report
from flywheel.common.server import channel_options
from flywheel.common.weight_push import push_messages
from flywheel.common.weights import WeightPushError, WeightReceiver, encode_push
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
        receiver = WeightReceiver(self.live, self.version, 1 << 40)
        try:
            for request in request_iterator:
                which = request.WhichOneof("message")
                receiver.feed(which, getattr(request, which))
            staged = receiver.finish()
        except WeightPushError as exc:
            context.abort(grpc.StatusCode[exc.status], str(exc))
        with torch.no_grad():
            for name, tensor in staged.tensors.items():
                self.live[name].copy_(tensor)
        self.version = staged.version
        result = common_pb2.WeightPushResult(version=staged.version, bytes_received=staged.bytes_received)
        return generator_pb2.GeneratorServicePushWeightsResponse(result=result)


def grpc_push(state: dict[str, torch.Tensor], version: int, port: int) -> float:
    plan = encode_push(state, version)  # checksums computed by the sender are part of the cost
    start = time.perf_counter()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options(MAX_MESSAGE))
    push_messages(channel, plan.messages(), token="", timeout=600)
    channel.close()
    return time.perf_counter() - start


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
    args = parse(__doc__ or "", argv)
    size = 100 * 10**6 if args.quick else 500 * 10**6
    state = make_state(size)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    live = {k: torch.zeros_like(v) for k, v in state.items()}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)])
    servicer = ReceiverServicer(live)
    generator_pb2_grpc.add_GeneratorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    rounds = 2 if args.quick else 3
    grpc_times = [grpc_push(state, v + 1, port) for v in range(rounds)]
    tcp_times = [tcp_push(state) for _ in range(rounds)]
    server.stop(0)
    assert all(torch.equal(live[k], state[k]) for k in state), "pushed weights differ"
    ours, base = nbytes / min(grpc_times) / 1e9, nbytes / min(tcp_times) / 1e9
    rows = [
        ("model bytes", f"{nbytes / 1e6:.0f} MB", f"{len(state)} tensors, fp32 + bf16"),
        ("PushWeights (gRPC stream)", f"{ours:.2f} GB/s", "best of rounds; encode+checksum+verify+swap"),
        ("raw TCP (same bytes)", f"{base:.2f} GB/s", "best of rounds; no verification"),
    ]
    return report("weight_push", rows, ours, base, target=0.7, unit="GB/s")


if __name__ == "__main__":
    main()
