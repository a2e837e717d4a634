"""The TCP side channel's receiving end (``weight_channel``) against a real loopback socket, with a
stand-in for the gRPC servicer context; and the receiver/staging-pool pieces it relies on."""

from __future__ import annotations

import gc
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from flywheel.common import weight_channel as wc
from flywheel.common import weights as w
from flywheel.v1 import common_pb2, generator_pb2

pytestmark = pytest.mark.timeout(60)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "big.weight": torch.randn(640, 1024, generator=g),  # 2.5 MiB: several windows, pooled staging
        "half.weight": torch.randn(300, 7, generator=g).to(torch.bfloat16),
        "ids": torch.arange(5, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }


class FakeContext:
    """The servicer-context surface weight_channel uses. When the receiver sends its offer, a pusher
    thread connects and sends what ``pusher`` writes (the real client is tested in integration)."""

    def __init__(
        self, pusher: Callable[[socket.socket, str], None] | None, time_remaining: float = 30.0
    ) -> None:
        self.pusher = pusher
        self.remaining = time_remaining
        self.active = True
        self.offer: dict[str, str] = {}
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def time_remaining(self) -> float:
        return self.remaining

    def is_active(self) -> bool:
        return self.active

    def send_initial_metadata(self, metadata: Any) -> None:
        self.offer = dict(metadata)
        if self.pusher is not None:
            self.thread = threading.Thread(target=self._push)
            self.thread.start()

    def _push(self) -> None:
        assert self.pusher is not None
        try:
            with socket.create_connection(("127.0.0.1", int(self.offer[wc.PORT_KEY])), timeout=30) as sock:
                self.pusher(sock, self.offer[wc.NONCE_KEY])
        except OSError as exc:  # the receiver hung up first: expected in the failure cases
            self.error = exc

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(30)


def _sender(
    payloads: list[bytes | memoryview], nonce: str | None = None, cut: int = 0
) -> Callable[..., None]:
    """Writes the nonce (or ``nonce``), the payloads (less the last ``cut`` bytes), half-closes."""

    def push(sock: socket.socket, offered: str) -> None:
        data = b"".join(bytes(p) for p in payloads)
        sock.sendall((nonce or offered).encode())
        sock.sendall(data[: len(data) - cut])
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # until the receiver closes: keeps the connection up while it reads

    return push


def _requests(plan: w.PushPlan) -> list[Any]:
    manifest = common_pb2.WeightManifest()
    manifest.CopyFrom(plan.manifest)
    manifest.transport = common_pb2.WEIGHT_TRANSPORT_TCP
    return [
        generator_pb2.GeneratorServicePushWeightsRequest(manifest=manifest),
        generator_pb2.GeneratorServicePushWeightsRequest(commit=common_pb2.WeightCommit(num_chunks=0)),
    ]


def _receive(plan: w.PushPlan, context: FakeContext, current: dict[str, torch.Tensor]) -> w.StagedWeights:
    receiver = w.WeightReceiver(current, 0, 1 << 30, side_channel=True)
    try:
        return wc.receive_push(iter(_requests(plan)), context, receiver, bind_host="127.0.0.1")
    finally:
        context.join()


def _assert_closed(context: FakeContext) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(context.offer[wc.PORT_KEY])), timeout=5).close()


def test_tcp_push_stages_exactly_the_tensors_and_closes_the_listener() -> None:
    current, new = _state(0), _state(1)
    plan = w.encode_push(new, 3, metadata={"step": "7"})
    context = FakeContext(_sender([p for _, p in plan.payloads]))
    staged = _receive(plan, context, current)
    assert (staged.version, staged.kind, staged.metadata) == (3, "full", {"step": "7"})
    assert staged.bytes_received == plan.manifest.total_encoded_nbytes
    assert set(staged.tensors) == set(new) and all(torch.equal(staged.tensors[k], new[k]) for k in new)
    assert len(context.offer[wc.NONCE_KEY]) == wc.NONCE_BYTES
    _assert_closed(context)


def test_tcp_delta_push_is_decoded_against_the_base() -> None:
    current = _state(0)
    new = {k: v.clone() for k, v in current.items()}
    new["big.weight"][3, :5] += 1.0
    plan = w.encode_push(new, 1, base=current, base_version=0)
    staged = _receive(plan, FakeContext(_sender([p for _, p in plan.payloads])), current)
    assert staged.kind == "delta" and set(staged.tensors) == {"big.weight"}
    assert torch.equal(staged.tensors["big.weight"], new["big.weight"])


def _corrupted(plan: w.PushPlan) -> list[bytes | memoryview]:
    """The payloads with one element of the first tensor negated (its checksum no longer matches)."""
    first = torch.frombuffer(bytearray(plan.payloads[0][1]), dtype=torch.float32)
    first[100] = -first[100]
    return [memoryview(first.numpy()).cast("B"), *(p for _, p in plan.payloads[1:])]


@pytest.mark.parametrize(("case", "reason", "status"), [
    ("wrong_nonce", "bad_nonce", "INVALID_ARGUMENT"),
    ("short_stream", "truncated", "DATA_LOSS"),
    ("extra_bytes", "too_large", "RESOURCE_EXHAUSTED"),
    ("checksum", "checksum_mismatch", "DATA_LOSS"),
    ("non_finite", "non_finite", "INVALID_ARGUMENT"),
    ("non_finite_late", "non_finite", "INVALID_ARGUMENT"),
])  # fmt: skip
def test_bad_side_channel_bytes_fail_the_push_and_close_the_listener(
    case: str, reason: str, status: str
) -> None:
    current, new = _state(0), _state(1)
    if case == "non_finite":  # checksummed with the NaN in it: only the finite check catches it
        new["big.weight"].view(-1)[100] = float("nan")
    if case == "non_finite_late":  # in the tensor's last window and verify block, sign set
        new["big.weight"].view(-1)[-3] = float("-inf")
    plan = w.encode_push(new, 1)
    payloads: list[bytes | memoryview] = [p for _, p in plan.payloads]
    pusher = {
        "wrong_nonce": _sender(payloads, nonce="0" * wc.NONCE_BYTES),
        "short_stream": _sender(payloads, cut=4097),
        "extra_bytes": _sender([*payloads, b"tail"]),
        "checksum": _sender(_corrupted(plan)),
        "non_finite": _sender(payloads),
        "non_finite_late": _sender(payloads),
    }[case]
    context = FakeContext(pusher)
    with pytest.raises(w.WeightPushError) as err:
        _receive(plan, context, current)
    assert (err.value.reason, err.value.status) == (reason, status)
    _assert_closed(context)


def test_a_pusher_that_never_connects_times_out_within_the_deadline() -> None:
    context = FakeContext(None, time_remaining=0.3)
    with pytest.raises(w.WeightPushError) as err:
        _receive(w.encode_push(_state(1), 1), context, _state(0))
    assert (err.value.reason, err.value.status) == ("side_channel_timeout", "DEADLINE_EXCEEDED")
    _assert_closed(context)


def test_a_cancelled_rpc_stops_waiting_for_the_pusher() -> None:
    context = FakeContext(None)
    context.active = False
    with pytest.raises(w.WeightPushError) as err:
        _receive(w.encode_push(_state(1), 1), context, _state(0))
    assert err.value.reason == "truncated"
    _assert_closed(context)


def test_grpc_stream_pushes_pass_through_unchanged() -> None:
    current, new = _state(0), _state(1)
    requests = [
        generator_pb2.GeneratorServicePushWeightsRequest(**{kind: message})
        for kind, message in w.iter_push_messages(new, 1, chunk_bytes=1 << 16)
    ]
    context = FakeContext(None)
    staged = wc.receive_push(
        iter(requests), context, w.WeightReceiver(current, 0, 1 << 30), bind_host="127.0.0.1"
    )
    assert all(torch.equal(staged.tensors[k], new[k]) for k in new) and context.offer == {}
    with pytest.raises(w.WeightPushError, match="empty PushWeights message"):
        wc.receive_push(iter([generator_pb2.GeneratorServicePushWeightsRequest()]), context,
                        w.WeightReceiver(current, 0, 1 << 30), bind_host="127.0.0.1")  # fmt: skip


# --- the receiver's side-channel API --------------------------------------------------------------


def _tcp_receiver(state: dict[str, torch.Tensor]) -> tuple[w.WeightReceiver, w.PushPlan]:
    plan = w.encode_push(state, 1)
    receiver = w.WeightReceiver(_state(0), 0, 1 << 30, side_channel=True)
    receiver.feed("manifest", _requests(plan)[0].manifest)
    return receiver, plan


def test_a_receiver_fed_without_the_side_channel_rejects_tcp_manifests_at_once() -> None:
    """A servicer not yet switched to weight_channel must not leave a TCP pusher waiting."""
    receiver = w.WeightReceiver(_state(0), 0, 1 << 30)
    with pytest.raises(w.WeightPushError, match="transport 3 is not supported here: use GRPC_STREAM or URI"):
        receiver.feed("manifest", _requests(w.encode_push(_state(1), 1))[0].manifest)


def test_receiver_takes_side_channel_bytes_and_rejects_chunks_or_overruns() -> None:
    new = _state(1)
    receiver, plan = _tcp_receiver(new)
    buffers = receiver.side_channel_buffers()
    assert [name for name, _ in buffers] == list(new)
    with pytest.raises(w.WeightPushError, match="chunks on a TCP push"):
        receiver.feed("chunk", common_pb2.WeightChunk(tensor_name="ids", offset=0, data=b"x"))
    with pytest.raises(w.WeightPushError) as err:
        receiver.advance("ids", 41)
    assert err.value.reason == "too_large"
    for (name, buffer), (_, payload) in zip(buffers, plan.payloads, strict=True):
        for start in range(0, payload.nbytes, 1000):  # odd pieces: split elements must still verify
            end = min(start + 1000, payload.nbytes)
            buffer[start:end] = payload[start:end]
            receiver.advance(name, end - start)
    receiver.feed("commit", common_pb2.WeightCommit(num_chunks=0))
    staged = receiver.finish()
    assert all(torch.equal(staged.tensors[k], new[k]) for k in new)
    grpc_receiver = w.WeightReceiver(_state(0), 0, 1 << 30)
    grpc_receiver.feed("manifest", plan.manifest)
    with pytest.raises(w.WeightPushError, match="without a TCP manifest"):
        grpc_receiver.side_channel_buffers()


def test_staging_memory_is_reused_only_once_nothing_references_it() -> None:
    pool = w.StagingPool(max_bytes=8 << 20)
    first = pool.take(2 << 20)
    tensor = torch.frombuffer(first, dtype=torch.float32)
    tensor.fill_(1.0)
    address = tensor.data_ptr()
    del first
    gc.collect()
    other = pool.take(2 << 20)  # the first block is still referenced by ``tensor``: a fresh one
    assert torch.frombuffer(other, dtype=torch.uint8).data_ptr() != address and pool.idle_bytes == 0
    del tensor
    gc.collect()
    assert pool.idle_bytes == 2 << 20
    again = pool.take(2 << 20)
    assert torch.frombuffer(again, dtype=torch.uint8).data_ptr() == address and pool.idle_bytes == 0
    del other, again
    gc.collect()
    assert pool.idle_bytes == 4 << 20
    held = [pool.take(3 << 20) for _ in range(3)]  # fresh: no 3 MiB block is idle
    del held
    gc.collect()  # 4 MiB idle + 3 x 3 MiB back, over max_bytes: the oldest size class goes first
    assert pool.idle_bytes == 6 << 20  # both 2 MiB blocks evicted, then one 3 MiB block (newest first: 7)


def test_staging_pool_finalizer_run_inside_its_own_locked_section_returns() -> None:
    """The cycle collector may run a buffer's finalizer on a thread that holds the pool's lock (any
    allocation in a locked section can trigger it): giving the block back must not wait for the
    lock, and the block must still reach the idle lists."""
    pool = w.StagingPool(max_bytes=8 << 20)
    holder: list[Any] = [pool.take(2 << 20)]
    holder.append(holder)  # a reference cycle: only the cycle collector frees the buffer
    address = torch.frombuffer(holder[0], dtype=torch.uint8).data_ptr()

    def collect_while_locked() -> None:
        with pool._lock:
            gc.collect()  # finalizes the buffer -> pool._give_back on this very thread

    gc.disable()  # no collection before we hold the lock
    try:
        del holder
        worker = threading.Thread(target=collect_while_locked, daemon=True)
        worker.start()
        worker.join(10)
    finally:
        gc.enable()
    assert not worker.is_alive(), "the pool's finalizer deadlocked on its own lock"
    assert pool.idle_bytes == 2 << 20
    again = pool.take(2 << 20)
    assert torch.frombuffer(again, dtype=torch.uint8).data_ptr() == address and pool.idle_bytes == 0


def test_only_a_receiver_built_with_side_channel_takes_tcp_manifests_from_feed() -> None:
    manifest = _requests(w.encode_push(_state(1), 1))[0].manifest
    plain = w.WeightReceiver(_state(0), 0, 1 << 30)
    with pytest.raises(w.WeightPushError, match="transport 3 is not supported here: use GRPC_STREAM or URI"):
        wc.feed(plain, "manifest", manifest, FakeContext(None), "127.0.0.1")
    receiver = w.WeightReceiver(_state(0), 0, 1 << 30, side_channel=True)
    receiver.feed("manifest", manifest)  # the receiver's part of weight_channel.feed
    assert [name for name, _ in receiver.side_channel_buffers()] == list(_state(1))


def test_finite_check_is_exact_for_every_16_bit_pattern() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)  # (65536,)
        finite = torch.isfinite(every.float())
        assert [w._all_finite(every[i : i + 1]) for i in range(every.numel())] == finite.tolist()
    for dtype in (torch.float32, torch.float64):
        t = torch.tensor(
            [0.0, -0.0, torch.finfo(dtype).max, -torch.finfo(dtype).max, torch.finfo(dtype).tiny], dtype=dtype
        )
        assert w._all_finite(t)
        for bad in (float("nan"), float("inf"), float("-inf")):
            assert not w._all_finite(torch.cat([t, torch.tensor([bad], dtype=dtype)]))
    # Edges of the two ranges, as bits: signed view for the positive half, unsigned for the negative.
    bits = {torch.float32: (torch.int32, 32, 23), torch.float64: (torch.int64, 64, 52)}
    for dtype, (view, width, mantissa) in bits.items():
        inf = ((1 << (width - 1 - mantissa)) - 1) << mantissa  # +Inf: exponent all ones
        sign = 1 << (width - 1)
        patterns = [inf - 1, sign | (inf - 1), sign, 0, inf, inf + 1, sign - 1, sign | inf, (1 << width) - 1]
        signed = torch.tensor([p - (1 << width) if p >= sign else p for p in patterns], dtype=view)
        got = [w._all_finite(signed[i : i + 1].view(dtype)) for i in range(len(patterns))]
        assert got == [True] * 4 + [False] * 5, dtype
