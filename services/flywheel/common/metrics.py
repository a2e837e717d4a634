"""Prometheus metrics: one registry per server (so tests can run several in one process),
served over HTTP on the server's own metrics port, plus an interceptor timing every RPC."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import grpc.aio
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from flywheel.common.rpc_handlers import rewrap

log = logging.getLogger("flywheel.rpc")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[Any, int]:
    """Starts the /metrics HTTP server; returns (server, bound port). Port 0 picks a free one."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port


class RpcMetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC by method and status code, and logs each call at DEBUG
    (failures at INFO/WARNING so they show in the default log)."""

    def __init__(self, service: str, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            f"flywheel_{service}_rpc_requests_total", "RPCs handled", ["method", "code"], registry=registry
        )
        self.duration = Histogram(
            f"flywheel_{service}_rpc_duration_seconds",
            "RPC handling time",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def _record(
        self, method: str, context: grpc.ServicerContext, start: float, failed: BaseException | None
    ) -> None:
        code = context.code() if hasattr(context, "code") else None  # type: ignore[attr-defined]
        if code is None and isinstance(failed, asyncio.CancelledError):
            # An asyncio handler is cancelled when its caller cancels or its deadline passes.
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        if code is None:
            code = grpc.StatusCode.UNKNOWN if failed is not None else grpc.StatusCode.OK
        elapsed = time.perf_counter() - start
        short = method.rsplit("/", 1)[-1]
        self.requests.labels(short, code.name).inc()
        self.duration.labels(short).observe(elapsed)
        level = logging.DEBUG if code is grpc.StatusCode.OK else logging.INFO
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            level = logging.WARNING
        details = context.details() if hasattr(context, "details") else ""  # type: ignore[attr-defined]
        log.log(level, "%s %s %.1fms %s", method, code.name, elapsed * 1000, details or "")

    def _wrap_unary(self, method: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                response = fn(request, context)
            except BaseException as exc:
                self._record(method, context, start, exc)
                raise
            self._record(method, context, start, None)
            return response

        return wrapped

    def _wrap_streaming(self, method: str, fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.perf_counter()
            try:
                yield from fn(request, context)
            except BaseException as exc:
                self._record(method, context, start, exc)
                raise
            self._record(method, context, start, None)

        return wrapped

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith("/grpc."):
            return handler
        wrap = self._wrap_streaming if handler.response_streaming else self._wrap_unary
        return rewrap(handler, lambda behaviour: wrap(method, behaviour))


class AioRpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """``RpcMetricsInterceptor`` for an asyncio server: the same metrics and log lines."""

    def __init__(self, service: str, registry: CollectorRegistry) -> None:
        self._sync = RpcMetricsInterceptor(service, registry)

    def _wrap_unary(self, method: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        record = self._sync._record

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                response = await fn(request, context)
            except BaseException as exc:
                record(method, context, start, exc)  # type: ignore[arg-type]
                raise
            record(method, context, start, None)  # type: ignore[arg-type]
            return response

        return wrapped

    def _wrap_streaming(self, method: str, fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        record = self._sync._record

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            try:
                async for response in fn(request, context):
                    yield response
            except BaseException as exc:
                record(method, context, start, exc)  # type: ignore[arg-type]
                raise
            record(method, context, start, None)  # type: ignore[arg-type]

        return wrapped

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith("/grpc."):
            return handler
        wrap = self._wrap_streaming if handler.response_streaming else self._wrap_unary
        return rewrap(handler, lambda behaviour: wrap(method, behaviour))
