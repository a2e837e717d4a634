"""The pushing side of weight transfer: one encoded push streamed to N receivers in parallel.

Used by the learner (policy -> every generator replica, reward model -> reward replicas) and by
tests and benches. Encoding (deltas, checksums) happens once; each target gets its own stream.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch

from flywheel.common.server import channel_options
from flywheel.common.weights import FULL, PushPlan, encode_push
from flywheel.v1 import common_pb2, generator_pb2, generator_pb2_grpc, reward_pb2, reward_pb2_grpc

STUBS = {
    "generator": (generator_pb2_grpc.GeneratorServiceStub, generator_pb2.GeneratorServicePushWeightsRequest),
    "reward": (reward_pb2_grpc.RewardServiceStub, reward_pb2.RewardServicePushWeightsRequest),
}
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


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
) -> dict[str, common_pb2.WeightPushResult | Exception]:
    """Pushes ``state`` as ``version`` (a delta against ``base`` when given) to every target in
    parallel. Returns per target the WeightPushResult or the exception (grpc.RpcError carries the
    receiver's status and message); one failing replica does not stop the others."""
    if stub not in STUBS:
        raise ValueError(f"stub={stub!r}: use one of {sorted(STUBS)}")
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
            outcome: common_pb2.WeightPushResult | Exception = push_messages(
                target, plan.messages(), token=token, stub=stub, timeout=timeout,
                max_message_bytes=max_message_bytes,
            )  # fmt: skip
        except Exception as exc:  # reported per target, not raised: the caller decides what to retry
            outcome = exc
        with lock:
            results[target] = outcome

    with ThreadPoolExecutor(max_workers=max(1, min(len(targets), 32)), thread_name_prefix="push") as pool:
        list(pool.map(push_one, targets))
    return {target: results[target] for target in targets}
