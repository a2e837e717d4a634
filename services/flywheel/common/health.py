"""Health probes of our servers from the outside (grpc.health.v1), used by `up`, `status` and tests."""

from __future__ import annotations

import contextlib
import socket
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def health_status(address: str, service: str = "", timeout: float = 2.0) -> str:
    """'SERVING', 'NOT_SERVING', 'UNKNOWN' or 'UNREACHABLE' for the server at ``address``."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def wait_serving(address: str, timeout: float, service: str = "", alive: object = None) -> None:
    """Blocks until the server reports SERVING. Uses the health Watch stream, so it wakes on the
    change itself rather than polling; raises TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{address} did not report SERVING within {timeout:.0f}s")
            if callable(alive) and not alive():
                raise RuntimeError(f"the process serving {address} exited")
            try:
                # Short slices so a dead child is noticed; Watch returns at once when SERVING.
                for reply in stub.Watch(
                    health_pb2.HealthCheckRequest(service=service), timeout=min(remaining, 1.0)
                ):
                    if reply.status == SERVING:
                        return
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                    raise
                if exc.code() is grpc.StatusCode.UNAVAILABLE:
                    channel_ready = grpc.channel_ready_future(channel)
                    with contextlib.suppress(grpc.FutureTimeoutError):
                        channel_ready.result(timeout=min(max(deadline - time.monotonic(), 0.01), 1.0))


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False
