"""The pushing side of weight transfer: one encoded push streamed to N receivers in parallel.

Used by the learner (policy -> every generator replica, reward model -> reward replicas) and by
tests and benches. Encoding (deltas, checksums) happens once; each target gets its own stream.
Two data planes: ``transport="grpc"`` (chunks on the PushWeights stream, the portable default) and
``transport="tcp"`` (the same stream carries manifest and commit, the bytes go over a one-shot
TCP connection the receiver offers in the RPC's initial metadata; see ``weight_channel``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch

from flywheel.common.server import channel_options
from flywheel.common.weight_channel import NONCE_KEY, PORT_KEY, set_io_timeout
from flywheel.common.weights import FULL, PushPlan, encode_push
from flywheel.v1 import common_pb2, generator_pb2, generator_pb2_grpc, reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)

STUBS = {
    "generator": (generator_pb2_grpc.GeneratorServiceStub, generator_pb2.GeneratorServicePushWeightsRequest),
    "reward": (reward_pb2_grpc.RewardServiceStub, reward_pb2.RewardServicePushWeightsRequest),
}
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
TRANSPORTS = ("grpc", "tcp")


def wrap_requests(messages: Iterator[tuple[str, Any]], stub: str = "generator") -> Iterator[Any]:
    """The codec's (kind, message) pairs as PushWeights requests of the ``stub`` service."""
    request_type = STUBS[stub][1]
    for kind, message in messages:
        yield request_type(**{kind: message})


def push_messages(
    target: str | grpc.Channel,
    messages: Iterator[tuple[str, Any]],
    *,
    token: str,
    stub: str = "generator",
    timeout: float = 600.0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> common_pb2.WeightPushResult:
    """Streams one push to one receiver; raises grpc.RpcError with the receiver's status."""
    stub_type = STUBS[stub][0]
    own = isinstance(target, str)
    channel = grpc.insecure_channel(target, options=channel_options(max_message_bytes)) if own else target
    try:
        response = stub_type(channel).PushWeights(
            wrap_requests(messages, stub), timeout=timeout, metadata=[("authorization", f"Bearer {token}")]
        )
        return response.result
    finally:
        if own:
            channel.close()


def push_plan(
    target: str | grpc.Channel,
    plan: PushPlan,
    *,
    token: str,
    transport: str = "grpc",
    stub: str = "generator",
    timeout: float = 600.0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    data_host: str | None = None,
) -> common_pb2.WeightPushResult:
    """Sends one encoded push to one receiver over ``transport``; raises grpc.RpcError with the
    receiver's status (or OSError when the TCP side channel cannot be reached at all).
    ``data_host``: where to connect the TCP side channel; defaults to the host of ``target``."""
    if transport == "grpc":
        return push_messages(target, plan.messages(), token=token, stub=stub, timeout=timeout,
                             max_message_bytes=max_message_bytes)  # fmt: skip
    if transport != "tcp":
        raise ValueError(f"transport={transport!r}: use one of {TRANSPORTS}")
    if isinstance(target, str):
        with grpc.insecure_channel(target, options=channel_options(max_message_bytes)) as channel:
            host = data_host or target_host(target)
            return _push_over_tcp(channel, plan, host, token=token, stub=stub, timeout=timeout)
    if data_host is None:
        raise ValueError("transport='tcp' with a grpc.Channel needs data_host= (the receiver's host)")
    return _push_over_tcp(target, plan, data_host, token=token, stub=stub, timeout=timeout)


def target_host(target: str) -> str:
    """The host of a gRPC target ("host:port", "[::1]:port", "dns:///host:port", "ipv4:host:port")."""
    address = target.split("///", 1)[-1] if "///" in target else target
    for scheme in ("ipv4:", "ipv6:", "dns:"):
        address = address.removeprefix(scheme)
    if address.startswith("unix:") or ":" not in address:
        raise ValueError(f"target {target!r}: transport='tcp' needs a host:port target")
    host = address.rsplit(":", 1)[0].strip("[]")
    if not host:
        raise ValueError(f"target {target!r} has no host")
    return host


def _push_over_tcp(
    channel: grpc.Channel, plan: PushPlan, host: str, *, token: str, stub: str, timeout: float
) -> common_pb2.WeightPushResult:
    """Manifest on the stream, bytes over the side channel the receiver announces in its initial
    metadata, then the commit. The request stream stays open (blocked before the commit) while the
    bytes travel; it ends without a commit when they could not all be sent, so the receiver
    rejects the push and its status is what this raises."""
    request_type = STUBS[stub][1]
    manifest = common_pb2.WeightManifest()
    manifest.CopyFrom(plan.manifest)
    manifest.transport = common_pb2.WEIGHT_TRANSPORT_TCP
    sent = threading.Event()
    released = threading.Event()

    def requests() -> Iterator[Any]:
        yield request_type(manifest=manifest)
        released.wait(timeout)
        if sent.is_set():
            yield request_type(commit=common_pb2.WeightCommit(num_chunks=0))

    deadline = time.monotonic() + timeout
    stub_type: Any = STUBS[stub][0]
    call = stub_type(channel).PushWeights.future(
        requests(), timeout=timeout, metadata=[("authorization", f"Bearer {token}")]
    )
    try:
        offer = dict(call.initial_metadata() or ())  # returns early (empty) if the receiver failed
        if PORT_KEY in offer and NONCE_KEY in offer:
            try:
                address = (host, int(offer[PORT_KEY]))
                connection = socket.create_connection(
                    address, timeout=max(deadline - time.monotonic(), 0.001)
                )
            except OSError:
                call.cancel()  # the receiver waits for us in accept(): let it go now
                raise
            with connection:
                try:
                    _send_payloads(connection, str(offer[NONCE_KEY]), plan, deadline)
                    sent.set()
                except OSError as exc:  # the receiver hung up; its status says why
                    log.warning("weight push to %s: side channel broke: %s", host, exc)
    finally:
        released.set()
    return call.result().result


def _send_payloads(connection: socket.socket, nonce: str, plan: PushPlan, deadline: float) -> None:
    set_io_timeout(connection, deadline - time.monotonic())
    connection.sendall(nonce.encode())
    for _, payload in plan.payloads:
        connection.sendall(payload)  # memoryviews of the tensors (or encoded deltas): no copies
    connection.shutdown(socket.SHUT_WR)


def push_weights(
    targets: Sequence[str],
    state: Mapping[str, torch.Tensor],
    version: int,
    *,
    token: str,
    base: Mapping[str, torch.Tensor] | None = None,
    base_version: int = 0,
    stub: str = "generator",
    timeout: float = 600.0,
    chunk_bytes: int = 1 << 20,
    metadata: Mapping[str, str] | None = None,
    kind: int = FULL,
    lora: common_pb2.LoraAdapterSpec | None = None,
    pusher: str = "",
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    transport: str = "grpc",
) -> dict[str, common_pb2.WeightPushResult | Exception]:
    """Pushes ``state`` as ``version`` (a delta against ``base`` when given) to every target in
    parallel. Returns per target the WeightPushResult or the exception (grpc.RpcError carries the
    receiver's status and message); one failing replica does not stop the others.
    ``transport``: "grpc" (bytes on the stream, default) or "tcp" (raw TCP side channel, for
    receivers on the same host or a fast network; targets must be "host:port")."""
    if stub not in STUBS:
        raise ValueError(f"stub={stub!r}: use one of {sorted(STUBS)}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport={transport!r}: use one of {TRANSPORTS}")
    if chunk_bytes + 4096 > max_message_bytes:
        raise ValueError(f"chunk_bytes={chunk_bytes} does not fit max_message_bytes={max_message_bytes}")
    plan: PushPlan = encode_push(
        state, version, base=base, base_version=base_version, chunk_bytes=chunk_bytes,
        metadata=metadata, kind=kind, lora=lora, pusher=pusher,
    )  # fmt: skip
    results: dict[str, common_pb2.WeightPushResult | Exception] = {}
    lock = threading.Lock()

    def push_one(target: str) -> None:
        try:
            outcome: common_pb2.WeightPushResult | Exception = push_plan(
                target, plan, token=token, transport=transport, stub=stub, timeout=timeout,
                max_message_bytes=max_message_bytes,
            )  # fmt: skip
        except Exception as exc:  # reported per target, not raised: the caller decides what to retry
            outcome = exc
        with lock:
            results[target] = outcome

    with ThreadPoolExecutor(max_workers=max(1, min(len(targets), 32)), thread_name_prefix="push") as pool:
        list(pool.map(push_one, targets))
    return {target: results[target] for target in targets}
