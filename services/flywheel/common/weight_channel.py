"""The receiving end of a TCP weight push: gRPC carries the control, a one-shot socket the bytes.

The negotiation, on an ordinary PushWeights stream (the pushing end is ``weight_push``):

1. The pusher sends the manifest with ``transport = WEIGHT_TRANSPORT_TCP``.
2. The receiver checks the manifest (``WeightReceiver``: versions, names, shapes, sizes), listens
   on the server's own bind host, port 0, and answers with the RPC's initial metadata:
   ``x-flywheel-weight-port`` (that port) and ``x-flywheel-weight-nonce`` (32 hex chars, single use).
3. The pusher connects, sends the nonce, then every tensor's encoded bytes in manifest order,
   and half-closes the connection.
4. The receiver reads the bytes straight into its staging buffers (``recv_into``, no copies), a
   window at a time; ``WeightReceiver.advance`` hashes and finite-checks each window right after
   it arrived, while it is in cache, so the verification is exactly that of a gRPC push and a bad
   tensor fails the push before the rest is read. Bytes past the declared sizes fail the push.
5. The pusher sends ``WeightCommit(num_chunks=0)``; the receiver finishes and swaps as usual.

One connection is accepted, and the listener is closed as soon as it has it, or on any failure.
Every wait is bounded by the RPC deadline (and ``MAX_WAIT_S``) and ends early when the RPC is
cancelled. No grpc import: the servicer's ``context`` is only asked for its deadline and liveness
and used to send the metadata; failures are ``WeightPushError`` like every other rejected push.
"""

from __future__ import annotations

import hmac
import secrets
import socket
import struct
import time
from collections.abc import Iterable
from typing import Any

from flywheel.common.weights import StagedWeights, WeightPushError, WeightReceiver
from flywheel.v1 import common_pb2

PORT_KEY = "x-flywheel-weight-port"
NONCE_KEY = "x-flywheel-weight-nonce"
NONCE_BYTES = 32  # secrets.token_hex(16)
MAX_WAIT_S = 600.0  # bound on the side channel when the RPC has no deadline
WINDOW_BYTES = 1 << 20  # received, then verified, at a time: fits the L2 (1 MiB per core here)
ACCEPT_POLL_S = 1.0  # how soon a cancelled RPC frees its listener


def receive_push(
    request_iterator: Iterable[Any], context: Any, receiver: WeightReceiver, *, bind_host: str
) -> StagedWeights:
    """Feeds a whole PushWeights stream (generator or reward requests: a ``message`` oneof of
    manifest/chunk/commit) to ``receiver``, taking the bytes of a TCP push over the side channel,
    and returns the verified push (``receiver`` built with ``side_channel=True`` takes TCP
    manifests). Raises WeightPushError."""
    for request in request_iterator:
        which = request.WhichOneof("message")
        if which is None:
            raise WeightPushError("malformed", "an empty PushWeights message: set manifest, chunk or commit")
        feed(receiver, which, getattr(request, which), context, bind_host)
    return receiver.finish()


def feed(receiver: WeightReceiver, kind: str, message: Any, context: Any, bind_host: str) -> None:
    """``receiver.feed(kind, message)``; after a TCP manifest it also receives every tensor's bytes
    over the side channel before returning (the commit follows on the stream). The receiver takes
    TCP manifests only if built with ``side_channel=True``."""
    receiver.feed(kind, message)
    if kind == "manifest" and message.transport == common_pb2.WEIGHT_TRANSPORT_TCP:
        receive_over_tcp(receiver, context, bind_host)


def receive_over_tcp(receiver: WeightReceiver, context: Any, bind_host: str) -> None:
    """Steps 2-4 of the negotiation for a receiver that has taken a TCP manifest."""
    buffers = receiver.side_channel_buffers()
    remaining = context.time_remaining()  # None or inf without a deadline, 0 once it passed
    deadline = time.monotonic() + min(MAX_WAIT_S if remaining is None else remaining, MAX_WAIT_S)
    nonce = secrets.token_hex(NONCE_BYTES // 2)
    with _listen(bind_host) as listener:
        context.send_initial_metadata(((PORT_KEY, str(listener.getsockname()[1])), (NONCE_KEY, nonce)))
        conn = _accept(listener, context, deadline)
    with conn:
        set_io_timeout(conn, deadline - time.monotonic())
        got = _recv_exactly(conn, memoryview(bytearray(NONCE_BYTES)), deadline)
        if not hmac.compare_digest(got, nonce.encode()):
            raise WeightPushError(
                "bad_nonce", "side channel: wrong nonce; use the one from this RPC's metadata"
            )
        for name, buffer in buffers:
            _recv_tensor(conn, receiver, name, buffer, deadline)
        _expect_end(conn)


def _listen(bind_host: str) -> socket.socket:
    """A listening socket on the server's configured host (never wider), on a free port."""
    host = bind_host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, 0), family=family, backlog=1)
    except OSError as exc:
        raise WeightPushError(
            "side_channel_unavailable",
            f"cannot listen on {bind_host!r} for the TCP side channel: {exc}; push over the gRPC stream instead",
        ) from exc


def _accept(listener: socket.socket, context: Any, deadline: float) -> socket.socket:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise WeightPushError("side_channel_timeout", "side channel: the pusher never connected")
        if not context.is_active():
            raise WeightPushError("truncated", "side channel: the RPC ended before the pusher connected")
        listener.settimeout(min(left, ACCEPT_POLL_S))
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        return conn


def set_io_timeout(sock: socket.socket, seconds: float) -> None:
    """A blocking socket whose reads and writes give up after ``seconds`` (SO_RCVTIMEO/SO_SNDTIMEO):
    unlike ``settimeout``, no poll() before every call, and MSG_WAITALL fills a window in one call."""
    sock.settimeout(None)
    whole = max(seconds, 0.001)
    timeval = struct.pack("ll", int(whole), int((whole % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _recv_tensor(
    conn: socket.socket, receiver: WeightReceiver, name: str, buffer: memoryview, deadline: float
) -> None:
    """Reads one tensor's bytes into its staging buffer a window at a time and verifies each window
    right away, on this thread, while the bytes the kernel just copied are still in this core's L2
    (the kernel keeps buffering the stream meanwhile). Measured on 2 busy cores, this takes less
    CPU and less time than a verifier thread a window behind, which reads them from another core
    and competes with the sender and this thread for the same two cores."""
    for start in range(0, buffer.nbytes, WINDOW_BYTES):
        window = buffer[start : start + WINDOW_BYTES]
        _recv_exactly(conn, window, deadline, what=name)
        receiver.advance(name, window.nbytes)


def _expect_end(conn: socket.socket) -> None:
    """The pusher must half-close right after the last tensor: more bytes mean a bad manifest."""
    try:
        extra = conn.recv(1)
    except OSError:  # a reset after every byte arrived: nothing is missing
        extra = b""
    if extra:
        raise WeightPushError(
            "too_large", "side channel: bytes beyond the manifest's tensors; send exactly their encoded bytes"
        )


def _recv_exactly(conn: socket.socket, view: memoryview, deadline: float, what: str = "nonce") -> memoryview:
    """Fills ``view`` (MSG_WAITALL: one call unless the peer trickles); bounded by ``deadline``."""
    got = 0
    while got < view.nbytes:
        if time.monotonic() > deadline:
            raise WeightPushError("side_channel_timeout", f"side channel: the RPC deadline passed in {what}")
        try:
            n = conn.recv_into(view[got:], 0, socket.MSG_WAITALL)
        except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO expired
            raise WeightPushError("side_channel_timeout", f"side channel: timed out reading {what}") from None
        except OSError as exc:
            raise WeightPushError(
                "truncated", f"side channel: connection lost reading {what}: {exc}"
            ) from exc
        if n == 0:
            raise WeightPushError(
                "truncated", f"side channel: the stream ended {view.nbytes - got} bytes short in {what}"
            )
        got += n
    return view
