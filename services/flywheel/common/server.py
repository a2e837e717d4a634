"""The gRPC server bootstrap every service uses.

Health (NOT_SERVING until the service says it is ready), reflection, bounded message sizes and
concurrency, keepalive, auth and RPC metrics interceptors, Prometheus on its own HTTP port, and
graceful shutdown on SIGTERM: health flips to NOT_SERVING, in-flight RPCs get ``grace_seconds``
to finish, then the server stops and shutdown hooks run (in reverse order of registration).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from collections.abc import Callable, Coroutine, Iterable
from concurrent import futures
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Gauge

from flywheel.common.auth import Access, AioAuthInterceptor, Authenticator, AuthInterceptor, load_api_keys
from flywheel.common.config import ConfigError, ServerConfig
from flywheel.common.metrics import AioRpcMetricsInterceptor, RpcMetricsInterceptor, serve_metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options for clients talking to our servers (same bounds, same keepalive)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class ServiceServer:
    """One gRPC server process for one Flywheel service.

    ``service_names`` are the full proto names (``flywheel.v1.GeneratorService``) registered for
    health and reflection; ``internal_methods`` lists full method paths that need the internal
    token, every other method of ours needs an API key (or the token).
    """

    def __init__(
        self,
        name: str,
        config: ServerConfig,
        service_names: Iterable[str],
        internal_methods: Iterable[str] = (),
        open_methods: Iterable[str] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.service_names = list(service_names)
        self.registry = registry or CollectorRegistry()
        self._internal = set(internal_methods)
        self._open = set(open_methods)
        self._load_hooks: list[Callable[[], None]] = []
        self._shutdown_hooks: list[Callable[[], None]] = []
        self._stop_requested = threading.Event()
        self._stopped = threading.Event()
        self._metrics_http: Any = None
        self.port = 0
        self.metrics_port = -1

        try:
            api_keys = load_api_keys(config.api_keys_file) if config.api_keys_file else []
        except (OSError, ValueError) as exc:
            raise ConfigError(f"api_keys_file: {exc}") from exc
        if config.auth_disabled:
            log.warning("%s: auth_disabled=true, every caller is trusted (never do this in production)", name)
        elif not config.internal_token:
            log.warning(
                "%s: no internal_token set: internal RPCs will be refused (set FLYWHEEL_INTERNAL_TOKEN)", name
            )
        authenticator = Authenticator(config.internal_token, api_keys, disabled=config.auth_disabled)

        self.up_gauge = Gauge(
            f"flywheel_{name}_up", "1 while the service reports SERVING", registry=self.registry
        )
        self.options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
            *KEEPALIVE_OPTIONS,
        ]
        self.server: Any = None
        self.health: Any = None
        self._create(authenticator)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _create(self, authenticator: Authenticator) -> None:
        """Creates ``self.server`` and ``self.health``."""
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.config.max_workers, thread_name_prefix=f"{self.name}-rpc"),
            interceptors=[
                RpcMetricsInterceptor(self.name, self.registry),
                AuthInterceptor(authenticator, self.access_of),
            ],
            options=self.options,
            maximum_concurrent_rpcs=self.config.max_concurrent_rpcs,
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    # --- wiring -----------------------------------------------------------------------------
    def access_of(self, method: str) -> Access:
        if method in self._open:
            return Access.OPEN
        return Access.INTERNAL if method in self._internal else Access.PUBLIC

    def add_servicer(self, add_fn: Callable[[Any, grpc.Server], None], servicer: Any) -> None:
        add_fn(servicer, self.server)

    def on_load(self, hook: Callable[[], None]) -> None:
        """Registers slow start-up work (loading models, connecting to Redis) that runs after the
        port is bound, while health still says NOT_SERVING."""
        self._load_hooks.append(hook)

    def on_shutdown(self, hook: Callable[[], None]) -> None:
        """Registers clean-up that runs after the server has drained (reverse order)."""
        self._shutdown_hooks.append(hook)

    def load(self) -> None:
        for hook in self._load_hooks:
            hook()

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> int:
        """Binds and starts serving (health stays NOT_SERVING until ``set_ready``). Returns the port."""
        self._bind()
        self.server.start()
        self._started()
        return self.port

    def _bind(self) -> None:
        """Reflection, the gRPC port and the metrics port; the server is not started yet."""
        names = [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self.server)
        address = f"{self.config.host}:{self.config.port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot bind {address}: {exc}; choose another port") from exc
        if self.port == 0:
            raise ConfigError(f"cannot bind {address} (in use?): choose another port")
        if self.config.metrics_port >= 0:
            try:
                self._metrics_http, self.metrics_port = serve_metrics(
                    self.registry, self.config.host, self.config.metrics_port
                )
            except OSError as exc:
                self._discard()
                raise ConfigError(f"cannot bind metrics port {self.config.metrics_port}: {exc}") from exc

    def _discard(self) -> None:
        """Drops a server that bound its port but never started."""
        self.server.stop(0)

    def _started(self) -> None:
        log.info(
            "%s listening on %s:%d (metrics on %d)", self.name, self.config.host, self.port, self.metrics_port
        )

    def set_ready(self, ready: bool = True) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self._set_health(status)

    def _set_health(self, status: int) -> None:
        for service in ["", *self.service_names]:
            self.health.set(service, status)
        self.up_gauge.set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)

    def request_stop(self) -> None:
        self._stop_requested.set()

    def stop(self, grace: float | None = None) -> None:
        """Health → NOT_SERVING, drain for ``grace`` seconds, stop, run shutdown hooks. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.grace_seconds if grace is None else grace
        log.info("%s shutting down: draining for up to %.1fs", self.name, grace)
        self._drain(grace)
        for hook in reversed(self._shutdown_hooks):
            try:
                hook()
            except Exception:
                log.exception("%s: shutdown hook failed", self.name)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._closed()
        log.info("%s stopped", self.name)

    def _drain(self, grace: float) -> None:
        """Health → NOT_SERVING, then stops the server once in-flight RPCs are done (or ``grace``)."""
        self.health.enter_graceful_shutdown()
        self.up_gauge.set(0)
        self.server.stop(grace).wait()

    def _closed(self) -> None:
        """Runs last in ``stop``, after the shutdown hooks."""

    def serve_forever(self) -> None:
        """Blocks until SIGTERM/SIGINT (or ``request_stop``), then stops gracefully."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop_requested.set())
        self._stop_requested.wait()
        self.stop()


class AioServiceServer(ServiceServer):
    """``ServiceServer`` on ``grpc.aio``: the same health, reflection, limits, auth, metrics and
    drain, with handlers that are coroutines on one event loop.

    For many small RPCs that mostly wait on something else (a batch on the model thread), this
    costs less per call than the thread-pool server: no hand-off from gRPC's poller thread to a
    pool thread and back, no pool thread blocked per waiting call. ``bench.reward_server``
    measures it on rule-only scoring, where nothing but the server costs anything: 1.18-1.45x the
    requests/s of the thread-pool server on this 2-core machine. (With the tiny reward model on 2 CPU cores, the model
    thread's own share of the GIL dominates and both servers score about as fast.)

    The loop runs in a thread of its own, so the public methods (``start``, ``set_ready``,
    ``stop``...) stay blocking calls from any other thread, exactly as on ``ServiceServer``;
    handlers must be ``async def``.
    """

    loop: asyncio.AbstractEventLoop

    def _create(self, authenticator: Authenticator) -> None:
        self.loop = asyncio.new_event_loop()
        # Blocking work handlers hand off (``asyncio.to_thread``: user rules, weight staging) gets
        # ``max_workers`` threads, as the thread-pool server's handlers do, not asyncio's cpus+4.
        self._executor = futures.ThreadPoolExecutor(
            max_workers=self.config.max_workers, thread_name_prefix=f"{self.name}-work"
        )
        self.loop.set_default_executor(self._executor)
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name=f"{self.name}-aio", daemon=True)
        self._loop_thread.start()

        async def create() -> tuple[Any, Any]:
            server = grpc.aio.server(
                interceptors=[
                    AioRpcMetricsInterceptor(self.name, self.registry),
                    AioAuthInterceptor(authenticator, self.access_of),
                ],
                options=self.options,
                maximum_concurrent_rpcs=self.config.max_concurrent_rpcs,
            )
            servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            return server, servicer

        self.server, self.health = self.run(create())

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Runs ``coroutine`` on the server's loop and waits for its result (from another thread)."""
        if threading.current_thread() is self._loop_thread:
            coroutine.close()
            raise RuntimeError("AioServiceServer.run() called on its own loop: await the coroutine instead")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def add_servicer(self, add_fn: Callable[[Any, grpc.Server], None], servicer: Any) -> None:
        async def add() -> None:
            add_fn(servicer, self.server)

        self.run(add())

    def start(self) -> int:
        async def start() -> None:
            try:
                self._bind()
            except BaseException:
                await self.server.stop(0)
                raise
            await self.server.start()

        try:
            self.run(start())
        except BaseException:
            self._closed()
            raise
        self._started()
        return self.port

    def _discard(self) -> None:
        pass  # start() stops the server itself: _bind runs on the loop, where stop must be awaited

    def _set_health(self, status: int) -> None:
        async def set_all() -> None:
            for service in ["", *self.service_names]:
                await self.health.set(service, status)

        self.run(set_all())
        self.up_gauge.set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)

    def _drain(self, grace: float) -> None:
        if self.loop.is_closed():  # start() failed and closed it: nothing is serving
            return

        async def drain() -> None:
            await self.health.enter_graceful_shutdown()
            self.up_gauge.set(0)
            await self.server.stop(grace)

        self.run(drain())

    def _closed(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()
        # Not waited for: a user rule stuck in a worker thread must not hold up the shutdown.
        self._executor.shutdown(wait=False, cancel_futures=True)


def run_service(server: ServiceServer) -> None:
    """Starts ``server`` (health NOT_SERVING), runs its load hooks (models, Redis), marks it SERVING
    and serves until SIGTERM. A failing load stops the server (running shutdown hooks) and re-raises."""
    server.start()
    try:
        server.load()
    except BaseException:
        server.stop(0)
        raise
    # Request handling allocates many short-lived objects; the few alive at a collection get
    # promoted, and every few hundred requests that triggers a full collection, which walked all
    # of the start-up heap (~60k objects: modules, protos, gRPC, models) — measured on the feedback
    # service as 30-40 ms stalls, its whole p99. That heap lives as long as the process: collect
    # once, then freeze it out of the collector's reach, so full collections walk young objects only.
    gc.collect()
    gc.freeze()
    server.set_ready()
    server.serve_forever()
