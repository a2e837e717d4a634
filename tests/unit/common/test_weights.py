"""The weights codec: round trips (full, delta, URI) and every rejection, with the reason and status."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from flywheel.common import weights as w
from flywheel.v1 import common_pb2


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 16, generator=g),
        "layer.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "layer.bias": torch.randn(16, generator=g).to(torch.float16),
        "scale": torch.tensor(2.0),
        "empty": torch.empty(0, 4),
    }


def _receive(
    current: dict[str, torch.Tensor],
    messages: Iterator[tuple[str, Any]],
    version: int = 1,
    max_bytes: int = 1 << 30,
) -> w.StagedWeights:
    receiver = w.WeightReceiver(current, version, max_bytes)
    for kind, message in messages:
        receiver.feed(kind, message)
    return receiver.finish()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and bool(
            torch.equal(
                a.view(-1).view(torch.uint8) if a.numel() else a,
                b.view(-1).view(torch.uint8) if b.numel() else b,
            )
        )
    )


def test_dtype_mapping_round_trips() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool):
        assert w.proto_to_torch_dtype(w.tensor_dtype_to_proto(dtype)) == dtype
    with pytest.raises(ValueError):
        w.tensor_dtype_to_proto(torch.complex64)


def test_checksum_is_xxh3_128_hex_and_sees_one_bit() -> None:
    t = torch.zeros(1000)
    digest = w.checksum(t)
    assert len(digest) == 32 and int(digest, 16) >= 0
    t2 = t.clone()
    t2[500] = -0.0  # differs only in the sign bit
    assert w.checksum(t2) != digest
    assert len(w.checksum(t, "sha256")) == 64


@pytest.mark.parametrize("chunk_bytes", [7, 1 << 20])
def test_full_push_round_trips_bit_exact(chunk_bytes: int) -> None:
    current, new = _state(0), _state(1)
    staged = _receive(current, w.iter_push_messages(new, 2, chunk_bytes=chunk_bytes, metadata={"step": "3"}))
    assert staged.version == 2 and staged.kind == "full" and staged.metadata == {"step": "3"}
    assert set(staged.tensors) == set(new)
    for name, t in new.items():
        assert _same(staged.tensors[name], t), name
    assert staged.bytes_received == sum(t.numel() * t.element_size() for t in new.values())


def test_delta_push_ships_only_changes_and_reconstructs() -> None:
    base = _state(0)
    new = {k: v.clone() for k, v in base.items()}
    new["embed.weight"][3, 4] += 1.0
    new["layer.weight"] = new["layer.weight"] + 1  # every element changes: raw is smaller
    messages = list(w.iter_push_messages(new, 5, base=base, base_version=4))
    manifest = messages[0][1]
    assert manifest.kind == w.DELTA and manifest.base_version == 4
    encodings = {s.name: s.encoding for s in manifest.tensors}
    assert encodings == {"embed.weight": w.SPARSE_DELTA, "layer.weight": w.RAW}
    staged = _receive(base, iter(messages), version=4)
    assert staged.kind == "delta" and set(staged.tensors) == {"embed.weight", "layer.weight"}
    for name, t in staged.tensors.items():
        assert _same(t, new[name])
    assert not torch.equal(base["embed.weight"], new["embed.weight"])  # the base was not patched in place


def test_xor_zlib_delta_round_trips() -> None:
    base = {"w": torch.zeros(4096, dtype=torch.bfloat16)}
    new = {"w": base["w"].clone()}
    new["w"][::2] = 1.0  # half the elements: sparse is larger than XOR+zlib of a regular pattern
    messages = list(w.iter_push_messages(new, 2, base=base, base_version=1, xor_zlib=True))
    assert messages[0][1].tensors[0].encoding == w.XOR_ZLIB
    assert _same(_receive(base, iter(messages)).tensors["w"], new["w"])


def test_uri_push_loads_file_and_dir(tmp_path: Path) -> None:
    current, new = _state(0), _state(2)
    new = {k: v for k, v in new.items() if v.numel()}  # safetensors stores empty tensors too, keep it simple
    cur = {k: current[k] for k in new}
    save_file(new, str(tmp_path / "model.safetensors"))
    for uri in (f"file://{tmp_path}/model.safetensors", str(tmp_path)):
        staged = _receive(cur, w.iter_uri_push_messages(uri, 2, state=new))
        assert all(_same(staged.tensors[k], new[k]) for k in new)
    with pytest.raises(w.WeightPushError) as err:
        _receive(cur, w.iter_uri_push_messages(str(tmp_path / "nope.safetensors"), 2))
    assert err.value.reason == "bad_uri"


def _corrupt(
    fn: Callable[[list[tuple[str, Any]]], list[tuple[str, Any]]], **kw: Any
) -> list[tuple[str, Any]]:
    return fn(list(w.iter_push_messages(_state(1), 2, chunk_bytes=64, **kw)))


def _edit_manifest(edit: Callable[[common_pb2.WeightManifest], None]) -> Callable[[list], list]:
    def apply(msgs: list) -> list:
        edit(msgs[0][1])
        return msgs

    return apply


def _flip_byte(msgs: list) -> list:
    chunk = msgs[1][1]
    chunk.data = bytes([chunk.data[0] ^ 1]) + chunk.data[1:]
    return msgs


def _nan(msgs: list) -> list:
    spec = msgs[0][1].tensors[0]
    t = _state(1)[spec.name].clone()
    t.view(-1)[0] = float("nan")
    spec.checksum = w.checksum(t)
    msgs[1][1].data = w.tensor_bytes(t)[:64].tobytes()
    return msgs


def _shape(m: common_pb2.WeightManifest) -> None:
    m.tensors[0].shape[0] += 1


def _dtype(m: common_pb2.WeightManifest) -> None:
    m.tensors[1].dtype = common_pb2.TENSOR_DTYPE_FLOAT32


def _rename(m: common_pb2.WeightManifest) -> None:
    m.tensors[0].name = "ghost"


def _drop(m: common_pb2.WeightManifest) -> None:
    del m.tensors[-1]


def _stale(m: common_pb2.WeightManifest) -> None:
    m.version = 1


def _swap_chunks(msgs: list) -> list:
    msgs[1], msgs[2] = msgs[2], msgs[1]
    return msgs


def _extra_bytes(msgs: list) -> list:
    msgs[-2][1].data += b"x"  # the last chunk runs past its tensor's declared size
    return msgs


BAD_PUSHES = {
    "checksum_mismatch": (_flip_byte, "DATA_LOSS"),
    "non_finite": (_nan, "INVALID_ARGUMENT"),
    "shape_mismatch": (_edit_manifest(_shape), "INVALID_ARGUMENT"),
    "dtype_mismatch": (_edit_manifest(_dtype), "INVALID_ARGUMENT"),
    "unknown_tensor": (_edit_manifest(_rename), "INVALID_ARGUMENT"),
    "missing_tensor": (_edit_manifest(_drop), "INVALID_ARGUMENT"),
    "stale_version": (_edit_manifest(_stale), "FAILED_PRECONDITION"),
    "bad_order": (_swap_chunks, "INVALID_ARGUMENT"),
    "too_large": (_extra_bytes, "RESOURCE_EXHAUSTED"),
    "truncated": (lambda msgs: msgs[:-1], "DATA_LOSS"),
}


@pytest.mark.parametrize("reason", sorted(BAD_PUSHES))
def test_bad_push_is_rejected_with_reason_and_status(reason: str) -> None:
    corrupt, status = BAD_PUSHES[reason]
    messages = _corrupt(corrupt)
    with pytest.raises(w.WeightPushError) as err:
        _receive(_state(0), iter(messages))
    assert (err.value.reason, err.value.status) == (reason, status), str(err.value)


def test_commit_with_wrong_chunk_count_is_truncated() -> None:
    msgs = list(w.iter_push_messages(_state(1), 2, chunk_bytes=64))
    del msgs[3]
    with pytest.raises(w.WeightPushError) as err:
        _receive(_state(0), iter(msgs))
    assert err.value.reason in ("truncated", "bad_order")


def test_delta_against_wrong_base_and_over_limit() -> None:
    base = _state(0)
    new = {k: v.clone() for k, v in base.items()}
    new["scale"] += 1
    with pytest.raises(w.WeightPushError) as err:
        _receive(base, w.iter_push_messages(new, 9, base=base, base_version=7), version=8)
    assert (err.value.reason, err.value.status) == ("base_mismatch", "FAILED_PRECONDITION")
    with pytest.raises(w.WeightPushError) as err:
        _receive(base, w.iter_push_messages(_state(1), 2), max_bytes=100)
    assert (err.value.reason, err.value.status) == ("too_large", "RESOURCE_EXHAUSTED")


def test_sparse_indices_out_of_range_are_rejected() -> None:
    base = {"w": torch.zeros(8)}
    new = {"w": torch.zeros(8)}
    new["w"][2] = 1.0
    msgs = list(w.iter_push_messages(new, 2, base=base, base_version=1))
    chunk = msgs[1][1]
    chunk.data = (100).to_bytes(8, "little") + chunk.data[8:]
    with pytest.raises(w.WeightPushError) as err:
        _receive(base, iter(msgs))
    assert err.value.reason == "malformed"


def test_swap_in_hands_staged_memory_to_whole_tensors_and_copies_into_shared_ones() -> None:
    fused = torch.zeros(2, 16)  # two live names are views of one storage (a fused weight)
    tied = torch.nn.Parameter(torch.zeros(64, 16))  # one Parameter under two names
    alias = torch.zeros(16)
    live = {
        "embed.weight": tied, "head.weight": tied, "layer.weight": torch.zeros(16, 16, dtype=torch.bfloat16),
        "layer.bias": alias, "layer.bias_alias": alias.view(16), "fused.a": fused[0], "fused.b": fused[1],
        "empty": torch.empty(0, 4),
    }  # fmt: skip
    g = torch.Generator().manual_seed(3)
    new = {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in live.items()}
    new["head.weight"] = new["embed.weight"]  # tied on the pushing side too
    new["layer.bias_alias"] = new["layer.bias"]
    objects = dict(live)
    staged = _receive(dict(live), w.iter_push_messages(new, 2))
    copied = w.swap_in(live, staged)
    for name, tensor in new.items():
        assert live[name] is objects[name] and _same(live[name], tensor), name
    # Whole storage, one tensor object on it: no copy (tied: the last name wins, as with copy_).
    assert live["layer.weight"].data_ptr() == staged.tensors["layer.weight"].data_ptr()
    assert tied.data_ptr() == staged.tensors["head.weight"].data_ptr()
    assert tied.requires_grad and isinstance(tied, torch.nn.Parameter)
    assert fused.data_ptr() == live["fused.a"].data_ptr() and _same(fused[1], new["fused.b"])
    assert live["layer.bias"].data_ptr() == live["layer.bias_alias"].data_ptr()  # still one storage
    assert copied == 4 * (16 + 16 + 2 * 16)  # both alias names, both fused halves


def test_swap_in_copies_when_the_memory_is_not_the_pushs_own_or_take_over_is_off(tmp_path: Path) -> None:
    new = {k: v for k, v in _state(1).items() if v.numel()}
    save_file(new, str(tmp_path / "w.safetensors"))
    from_file = w.iter_uri_push_messages(str(tmp_path / "w.safetensors"), 2, state=new)  # maybe mapped
    for take_over, messages in ((True, from_file), (False, w.iter_push_messages(new, 2))):
        live = {k: v.clone() for k, v in _state(0).items() if v.numel()}
        pointers = {k: v.data_ptr() for k, v in live.items()}
        w.swap_in(live, _receive(dict(live), messages), take_over=take_over)
        assert all(_same(live[k], new[k]) and live[k].data_ptr() == pointers[k] for k in new)
