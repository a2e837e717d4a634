"""Weight pushes over the TCP side channel into real generator servers (in-process, free ports,
the tiny model): gRPC carries manifest and commit, the bytes go over the negotiated socket."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import psutil
import pytest
import torch

from flywheel.common import weights as w
from flywheel.common.weight_channel import NONCE_BYTES, NONCE_KEY, PORT_KEY
from flywheel.common.weight_push import push_plan, push_weights
from flywheel.generator.config import GeneratorConfig
from flywheel.generator.server import build_server
from flywheel.v1 import common_pb2, generator_pb2
from tests.conftest import auth
from tests.generator_helpers import Gen, perturbed

pytestmark = pytest.mark.timeout(180)
SAMPLING = {"temperature": 0.8, "seed": 3, "max_new_tokens": 6}


@pytest.fixture
def start_gen(
    start_server: Callable[..., Any], server_config: dict[str, Any], tiny_llama_path: str,
    internal_token: str, api_key: str,
) -> Iterator[Callable[[], Gen]]:  # fmt: skip
    gens: list[Gen] = []

    def start() -> Gen:
        config = GeneratorConfig(model=tiny_llama_path, max_wait_ms=2.0, **server_config)
        gens.append(Gen.connect(start_server(build_server, config), internal_token, api_key,
                                defaults={"sampling": SAMPLING}))  # fmt: skip
        return gens[-1]

    yield start
    for gen in gens:
        gen.close()


def _listening_ports() -> set[int]:
    """TCP ports this process (which runs the servers) listens on."""
    return {c.laddr.port for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN}


def _result_fields(result: common_pb2.WeightPushResult) -> tuple[int, int, int, int]:
    return result.version, result.previous_version, result.bytes_received, result.tensors_updated


def test_tcp_push_changes_outputs_and_bumps_the_version_exactly_like_a_grpc_push(
    start_gen: Callable[[], Gen],
) -> None:
    over_grpc, over_tcp = start_gen(), start_gen()
    before = over_tcp.outputs()
    listening = _listening_ports()
    base = over_tcp.live_state()
    v1 = perturbed(base, 1)
    v2 = {k: t.clone() for k, t in v1.items()}
    v2["lm_head.weight"][:, :8] *= -1  # a delta: only some elements change
    for version, state, delta in ((1, v1, {}), (2, v2, {"base": v1, "base_version": 1})):
        plan = w.encode_push(state, version, **delta)  # type: ignore[arg-type]
        by_grpc = push_plan(over_grpc.target, plan, token=over_grpc.token, transport="grpc")
        by_tcp = push_plan(over_tcp.target, plan, token=over_tcp.token, transport="tcp")
        assert _result_fields(by_tcp) == _result_fields(by_grpc) and by_tcp.version == version
        assert over_tcp.version() == over_grpc.version() == version
        live = over_tcp.engine.weights_for_push()
        assert all(torch.equal(live[k], state[k]) for k in state)
        after = over_tcp.outputs()
        assert after == over_grpc.outputs() and {o[2] for o in after} == {version}
        assert [o[0] for o in after] != [o[0] for o in before]
        before = after
    assert _listening_ports() == listening


def _push_by_hand(
    gen: Gen, plan: w.PushPlan, write: Callable[[socket.socket, str], None]
) -> tuple[int, grpc.RpcError]:
    """Drives the negotiation with a hand-made pusher: manifest, the offer from the initial
    metadata, ``write(sock, nonce)`` on the side channel, commit. Returns the offered port and the
    RPC's error (these pushes must fail)."""
    manifest = common_pb2.WeightManifest()
    manifest.CopyFrom(plan.manifest)
    manifest.transport = common_pb2.WEIGHT_TRANSPORT_TCP
    written = threading.Event()
    request = generator_pb2.GeneratorServicePushWeightsRequest

    def requests() -> Iterator[Any]:
        yield request(manifest=manifest)
        written.wait(60)
        yield request(commit=common_pb2.WeightCommit(num_chunks=0))

    call = gen.stub.PushWeights.future(requests(), timeout=60, metadata=auth(gen.token))
    offer = dict(call.initial_metadata())
    port = int(offer[PORT_KEY])
    assert len(offer[NONCE_KEY]) == NONCE_BYTES
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            write(sock, str(offer[NONCE_KEY]))
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # the receiver hangs up once it has judged the bytes
    except OSError:  # it hung up while we were still writing
        pass
    finally:
        written.set()
    with pytest.raises(grpc.RpcError) as err:
        call.result()
    return port, err.value


def test_bad_tcp_pushes_are_rejected_and_outputs_stay_bit_identical(start_gen: Callable[[], Gen]) -> None:
    gen = start_gen()
    reference = gen.outputs()
    listening = _listening_ports()
    new = perturbed(gen.live_state(), 9)
    plan = w.encode_push(new, 5)
    data = b"".join(bytes(p) for _, p in plan.payloads)
    cases: dict[str, tuple[Callable[[socket.socket, str], None], grpc.StatusCode]] = {
        "bad_nonce": (
            lambda s, nonce: s.sendall(b"f" * NONCE_BYTES + data),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "truncated": (lambda s, nonce: s.sendall(nonce.encode() + data[:-1000]), grpc.StatusCode.DATA_LOSS),
        "checksum_mismatch": (
            lambda s, nonce: s.sendall(nonce.encode() + bytes([data[0] ^ 0xFF]) + data[1:]),
            grpc.StatusCode.DATA_LOSS,
        ),
        "too_large": (
            lambda s, nonce: s.sendall(nonce.encode() + data + b"more"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    }
    for reason, (write, code) in cases.items():
        port, error = _push_by_hand(gen, plan, write)
        assert error.code() == code, reason
        assert error.details().startswith(reason), error.details()
        assert gen.version() == 0 and gen.outputs() == reference
        with pytest.raises(ConnectionRefusedError):  # the one-shot listener is gone
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
    corrupted = w.encode_push(new, 5)
    first = bytearray(corrupted.payloads[0][1])
    first[0] ^= 0xFF
    corrupted.payloads[0] = (corrupted.payloads[0][0], memoryview(first))
    with pytest.raises(grpc.RpcError) as err:  # the real client, bad bytes: same verdict
        push_plan(gen.target, corrupted, token=gen.token, transport="tcp")
    assert err.value.code() == grpc.StatusCode.DATA_LOSS and err.value.details().startswith(
        "checksum_mismatch"
    )
    with pytest.raises(grpc.RpcError) as err:  # no internal token: refused before any listener opens
        push_plan(gen.target, plan, token=gen.api_key, transport="tcp")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    stale = w.encode_push(new, 0)
    with pytest.raises(grpc.RpcError) as err:  # rejected at the manifest: no side channel offered
        push_plan(gen.target, stale, token=gen.token, transport="tcp")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert gen.version() == 0 and gen.outputs() == reference
    assert _listening_ports() == listening
    failures = gen.server.registry.get_sample_value(
        "flywheel_generator_push_failures_total", {"reason": "checksum_mismatch"}
    )
    assert failures == 2.0


def test_push_weights_over_tcp_to_two_generators_in_parallel(start_gen: Callable[[], Gen]) -> None:
    gens = [start_gen(), start_gen()]
    listening = _listening_ports()
    new = perturbed(gens[0].live_state(), 4)
    results = push_weights([g.target for g in gens], new, 1, token=gens[0].token, transport="tcp")
    for gen in gens:
        result = results[gen.target]
        assert isinstance(result, common_pb2.WeightPushResult), result
        assert (result.version, result.previous_version) == (1, 0) and gen.version() == 1
        live = gen.engine.weights_for_push()
        assert all(torch.equal(live[k], new[k]) for k in new)
    assert gens[0].outputs() == gens[1].outputs()
    assert _listening_ports() == listening
    with pytest.raises(ValueError, match="transport"):
        push_weights([gens[0].target], new, 2, token=gens[0].token, transport="shm")


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype
        and torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8))
        for k in a
    )


def test_pushes_after_a_swap_recycle_staging_memory_and_failures_leave_the_swapped_weights(
    start_gen: Callable[[], Gen],
) -> None:
    """A push hands its staged memory to the model and the memory it replaces is recycled as
    staging for later pushes: a failing push must never write into what is serving."""
    gen = start_gen()
    model = dict(gen.engine.model.named_parameters(remove_duplicate=False))
    state = gen.live_state()
    for version in (1, 2):
        state = perturbed(state, 20 + version)
        before = {n: p.data_ptr() for n, p in model.items()}
        push_plan(gen.target, w.encode_push(state, version), token=gen.token, transport="tcp")
        serving, outputs = gen.live_state(), gen.outputs()
        assert _same_bits(serving, state) and {o[2] for o in outputs} == {version}
        assert all(torch.equal(p, state[n]) for n, p in model.items() if n in state)  # the model's own
        assert all(p.data_ptr() != before[n] for n, p in model.items())  # taken over, not copied into
        bad = w.encode_push(perturbed(state, 30 + version), version + 10)
        last = bytearray(bad.payloads[-1][1])
        last[-1] ^= 0xFF  # detected only once every byte has been staged
        bad.payloads[-1] = (bad.payloads[-1][0], memoryview(last))
        with pytest.raises(grpc.RpcError) as err:
            push_plan(gen.target, bad, token=gen.token, transport="tcp")
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        assert gen.version() == version and _same_bits(gen.live_state(), serving)
        assert gen.outputs() == outputs
