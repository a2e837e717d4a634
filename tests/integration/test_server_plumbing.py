"""The shared bootstrap, over real sockets: health, reflection, auth, size limits, metrics, drain,
for both servers: the thread-pool ``ServiceServer`` and the asyncio ``AioServiceServer``."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from flywheel.common.auth import current_client
from flywheel.common.config import ServerConfig
from flywheel.common.server import AioServiceServer, ServiceServer
from flywheel.services import SERVICES
from flywheel.v1 import learner_pb2, learner_pb2_grpc
from tests.conftest import auth

LEARNER = "flywheel.v1.LearnerService"


def _config(server_config: dict[str, Any], service: str, tiny_llama_path: str, tiny_reward_path: str) -> Any:
    cls = SERVICES[service].config_class()
    extra: dict[str, Any] = {}
    if service == "generator":
        extra["model"] = tiny_llama_path
    if service == "reward":
        extra["model"] = tiny_reward_path
    if service == "learner":
        extra["policy_model"] = tiny_llama_path
        extra["checkpoint_dir"] = server_config["data_dir"] + "/ckpt"
        extra["run_dir"] = server_config["data_dir"] + "/run"
    return cls(**server_config, **extra)


def _build(service: str) -> Any:
    import importlib

    return importlib.import_module(SERVICES[service].server_module).build_server


def _call_raw(channel: grpc.Channel, method: Any, path: str, metadata: list[tuple[str, str]]) -> Any:
    """Calls ``path`` with an empty request (message or stream) of the method's shape."""
    if method.client_streaming and method.server_streaming:
        return list(channel.stream_stream(path)(iter([b""]), timeout=5, metadata=metadata))
    if method.client_streaming:
        return channel.stream_unary(path)(iter([b""]), timeout=5, metadata=metadata)
    if method.server_streaming:
        return list(channel.unary_stream(path)(b"", timeout=5, metadata=metadata))
    return channel.unary_unary(path)(b"", timeout=5, metadata=metadata)


def _list_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    return {s.name for reply in replies for s in reply.list_services_response.service}


@pytest.mark.parametrize("service", list(SERVICES))
def test_each_service_boots_serving_with_reflection_and_auth(
    service: str, server_config: dict[str, Any], start_server: Any, tiny_llama_path: str, tiny_reward_path: str,
    api_key: str,
) -> None:
    server = start_server(_build(service), _config(server_config, service, tiny_llama_path, tiny_reward_path))
    proto_name = SERVICES[service].proto_service
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", proto_name):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert proto_name in _list_services(channel)

        # Every method of ours rejects a call without credentials, or with a wrong key;
        # internal methods also refuse API keys.
        for method in descriptor_pool.Default().FindServiceByName(proto_name).methods:
            path = f"/{proto_name}/{method.name}"
            cases = [([], grpc.StatusCode.UNAUTHENTICATED), (auth("not-a-key"), grpc.StatusCode.UNAUTHENTICATED)]
            if path in server._internal:
                cases.append((auth(api_key), grpc.StatusCode.PERMISSION_DENIED))
            for metadata, code in cases:
                with pytest.raises(grpc.RpcError) as err:
                    _call_raw(channel, method, path, metadata)
                assert err.value.code() is code, (path, metadata)


class BlockingLearner(learner_pb2_grpc.LearnerServiceServicer):
    """GetStatus blocks until released: an in-flight RPC to watch a drain."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.entered.set()
        self.release.wait(30)
        # run_dir carries the caller's identity as the auth interceptor established it.
        return learner_pb2.GetStatusResponse(status=learner_pb2.LearnerStatus(step=7, run_dir=current_client()))


class AsyncBlockingLearner(learner_pb2_grpc.LearnerServiceServicer):
    """BlockingLearner for the asyncio server: its handlers are coroutines."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    async def GetStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.entered.set()
        await asyncio.to_thread(self.release.wait, 30)
        return learner_pb2.GetStatusResponse(status=learner_pb2.LearnerStatus(step=7, run_dir=current_client()))

    async def Pause(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Pause is not implemented here")


@pytest.fixture(params=["threads", "asyncio"])
def plumbing(request: pytest.FixtureRequest, server_config: dict[str, Any]) -> Any:
    config = ServerConfig(**{**server_config, "max_message_bytes": 4096, "grace_seconds": 30})
    cls, servicer = (
        (ServiceServer, BlockingLearner()) if request.param == "threads" else (AioServiceServer, AsyncBlockingLearner())
    )
    server = cls("learner", config, [LEARNER], internal_methods=[f"/{LEARNER}/Pause"])
    server.add_servicer(learner_pb2_grpc.add_LearnerServiceServicer_to_server, servicer)
    server.start()
    server.set_ready()
    yield server, servicer
    servicer.release.set()
    server.stop(0)


def test_oversized_message_is_resource_exhausted(plumbing: Any, internal_token: str) -> None:
    server, _ = plumbing
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = learner_pb2_grpc.LearnerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Pause(learner_pb2.PauseRequest(reason="x" * 10_000), timeout=5, metadata=auth(internal_token))
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # A message under the bound reaches the (unimplemented) handler.
        with pytest.raises(grpc.RpcError) as err:
            stub.Pause(learner_pb2.PauseRequest(reason="ok"), timeout=5, metadata=auth(internal_token))
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_metrics_port_serves_rpc_counts(plumbing: Any, internal_token: str) -> None:
    server, _ = plumbing
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, pytest.raises(grpc.RpcError):
        learner_pb2_grpc.LearnerServiceStub(channel).Pause(learner_pb2.PauseRequest(), timeout=5)
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert "flywheel_learner_up 1.0" in body
    assert 'flywheel_learner_rpc_requests_total{code="UNAUTHENTICATED",method="Pause"} 1.0' in body


def test_graceful_stop_drains_in_flight_rpcs(plumbing: Any, api_key: str) -> None:
    server, servicer = plumbing
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = learner_pb2_grpc.LearnerServiceStub(channel)
    in_flight = stub.GetStatus.future(learner_pb2.GetStatusRequest(), timeout=30, metadata=auth(api_key))
    assert servicer.entered.wait(10)

    stopper = threading.Thread(target=server.stop)
    stopper.start()
    health = health_pb2_grpc.HealthStub(channel)
    # Health flips to NOT_SERVING as soon as the drain starts (or the port is already closing).
    try:
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert any(r.status == health_pb2.HealthCheckResponse.NOT_SERVING for r in watch)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)

    servicer.release.set()
    status = in_flight.result().status
    assert status.step == 7  # the in-flight RPC completed normally
    assert status.run_dir == "tests"  # the API key's client name, from api_keys_file
    stopper.join(30)
    assert not stopper.is_alive()
    channel.close()
