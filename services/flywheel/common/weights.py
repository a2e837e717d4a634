"""The weights codec shared by every service that takes weight pushes (generator, reward).

Sender side: ``iter_push_messages`` turns a state dict into the PushWeights stream — a manifest
(names, dtypes, shapes, encodings, per-tensor checksums of the *result*), chunks of each tensor's
encoded bytes, a commit. Given a ``base`` it builds a delta: unchanged tensors are omitted and a
changed one travels as a sparse delta (int64 indices + new values) or raw, whichever is smaller.

Receiver side: ``WeightReceiver`` stages a push into buffers of its own and verifies all of it
(order, sizes, names, shapes, dtypes, checksums, finite values, version/base) before ``finish``
hands back the complete new tensors. It never touches the live model, so a failed push leaves the
serving version untouched; the engine swaps the staged tensors in (``swap_in``: the live tensors
take over the staged memory where they can, no copy). The bytes arrive as chunks on the stream
(``feed``) or, for a TCP push, written straight into the staging buffers by the side channel
(``side_channel_buffers`` + ``advance``, see ``weight_channel``); either way a RAW tensor is
hashed and finite-checked piece by piece as it arrives, in one pass while the bytes are in cache.

No grpc import here: failures are ``WeightPushError`` carrying a metric label (``reason``) and the
name of the gRPC status code (``status``) that the servicer maps.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
import weakref
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from flywheel.v1 import common_pb2

FULL = common_pb2.WEIGHT_PUSH_KIND_FULL
DELTA = common_pb2.WEIGHT_PUSH_KIND_DELTA
LORA = common_pb2.WEIGHT_PUSH_KIND_LORA
RAW = common_pb2.TENSOR_ENCODING_RAW
SPARSE_DELTA = common_pb2.TENSOR_ENCODING_SPARSE_DELTA
XOR_ZLIB = common_pb2.TENSOR_ENCODING_XOR_ZLIB
KIND_NAMES = {FULL: "full", DELTA: "delta", LORA: "lora"}
CHECKSUM_ALGORITHMS = ("xxh3_128", "sha256")
INDEX_BYTES = 8  # sparse-delta indices are int64
STAGING_POOL_MAX_BYTES = 4 << 30  # staging memory kept between pushes (see StagingPool)
# Where the bytes of a push may travel (URI: read by the receiver; TCP: see weight_channel).
_TRANSPORTS = (
    common_pb2.WEIGHT_TRANSPORT_GRPC_STREAM,
    common_pb2.WEIGHT_TRANSPORT_TCP,
    common_pb2.WEIGHT_TRANSPORT_URI,
)

if sys.byteorder != "little":  # the wire format is little-endian and we send tensor memory as is
    raise ImportError("flywheel.common.weights needs a little-endian host")

_TO_PROTO = {
    torch.float32: common_pb2.TENSOR_DTYPE_FLOAT32,
    torch.float16: common_pb2.TENSOR_DTYPE_FLOAT16,
    torch.bfloat16: common_pb2.TENSOR_DTYPE_BFLOAT16,
    torch.float64: common_pb2.TENSOR_DTYPE_FLOAT64,
    torch.int64: common_pb2.TENSOR_DTYPE_INT64,
    torch.int32: common_pb2.TENSOR_DTYPE_INT32,
    torch.int16: common_pb2.TENSOR_DTYPE_INT16,
    torch.int8: common_pb2.TENSOR_DTYPE_INT8,
    torch.uint8: common_pb2.TENSOR_DTYPE_UINT8,
    torch.bool: common_pb2.TENSOR_DTYPE_BOOL,
}
_FROM_PROTO = {v: k for k, v in _TO_PROTO.items()}
# Integer views with the same element size: comparing them compares bits (NaN-safe, -0.0 != 0.0).
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Float dtype -> (signed and unsigned integer views, bits of +Inf and of -Inf: exponent all ones).
_NON_FINITE = {
    torch.float16: (np.int16, np.uint16, 0x7C00, 0xFC00),
    torch.bfloat16: (np.int16, np.uint16, 0x7F80, 0xFF80),
    torch.float32: (np.int32, np.uint32, 0x7F80_0000, 0xFF80_0000),
    torch.float64: (np.int64, np.uint64, 0x7FF0_0000_0000_0000, 0xFFF0_0000_0000_0000),
}
# Bytes verified at a time: hashed, then finite-checked while they are still in L2 (1 MiB here).
_VERIFY_BLOCK = 1 << 19

# Failure reason (metric label) -> gRPC status code name.
REASON_STATUS = {
    "checksum_mismatch": "DATA_LOSS",
    "truncated": "DATA_LOSS",
    "unknown_tensor": "INVALID_ARGUMENT",
    "missing_tensor": "INVALID_ARGUMENT",
    "shape_mismatch": "INVALID_ARGUMENT",
    "dtype_mismatch": "INVALID_ARGUMENT",
    "non_finite": "INVALID_ARGUMENT",
    "bad_order": "INVALID_ARGUMENT",
    "bad_uri": "INVALID_ARGUMENT",
    "malformed": "INVALID_ARGUMENT",
    "bad_adapter": "INVALID_ARGUMENT",
    "stale_version": "FAILED_PRECONDITION",
    "base_mismatch": "FAILED_PRECONDITION",
    "too_large": "RESOURCE_EXHAUSTED",
    "bad_nonce": "INVALID_ARGUMENT",  # TCP side channel: a connection without this push's nonce
    "side_channel_timeout": "DEADLINE_EXCEEDED",
    "reload_failed": "INTERNAL",  # the engine could not load verified weights (the old ones were restored)
    "side_channel_unavailable": "UNAVAILABLE",
}


class WeightPushError(Exception):
    """A push was rejected. ``reason`` is a short metric label, ``status`` a grpc.StatusCode name."""

    def __init__(self, reason: str, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status or REASON_STATUS.get(reason, "INVALID_ARGUMENT")


# --- tensors <-> bytes ------------------------------------------------------------------------


def tensor_dtype_to_proto(dtype: torch.dtype) -> int:
    try:
        return _TO_PROTO[dtype]
    except KeyError:
        raise ValueError(
            f"dtype {dtype} cannot travel in a weight push; use one of {list(_TO_PROTO)}"
        ) from None


def proto_to_torch_dtype(value: int) -> torch.dtype:
    try:
        return _FROM_PROTO[value]
    except KeyError:
        raise WeightPushError("malformed", f"unknown TensorDtype {value}") from None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian C-contiguous bytes, without a copy when already contiguous on CPU."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def checksum(tensor: torch.Tensor | bytes | memoryview, algorithm: str = "xxh3_128") -> str:
    """Lowercase hex digest of the tensor's raw bytes (xxh3_128: ~10+ GB/s, never the bottleneck)."""
    data = tensor_bytes(tensor) if isinstance(tensor, torch.Tensor) else tensor
    if algorithm in ("", "xxh3_128"):
        return xxhash.xxh3_128_hexdigest(data)
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    raise WeightPushError("malformed", f"checksum_algorithm={algorithm!r}: use one of {CHECKSUM_ALGORITHMS}")


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(_BITS[flat.element_size()])


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * dtype.itemsize


# --- sender -----------------------------------------------------------------------------------


@dataclass
class _Encoded:
    spec: common_pb2.TensorSpec
    payload: memoryview


def _encode_delta(
    name: str, new: torch.Tensor, old: torch.Tensor, algorithm: str, xor_zlib: bool
) -> _Encoded | None:
    """The cheapest encoding of ``new`` against ``old``, or None when they are bit-identical."""
    new_bits, old_bits = _bits(new), _bits(old)
    changed = torch.nonzero(new_bits != old_bits).reshape(-1)  # (k,) int64, ascending
    if changed.numel() == 0:
        return None
    spec = common_pb2.TensorSpec(
        name=name,
        dtype=tensor_dtype_to_proto(new.dtype),
        shape=list(new.shape),
        checksum=checksum(new, algorithm),
    )
    raw = tensor_bytes(new)
    sparse_nbytes = changed.numel() * (INDEX_BYTES + new.element_size())
    best: tuple[int, int, memoryview] = (raw.nbytes, RAW, raw)
    if sparse_nbytes < best[0]:
        values = new_bits[changed]
        payload = memoryview(changed.numpy().tobytes() + values.view(torch.uint8).numpy().tobytes())
        best = (sparse_nbytes, SPARSE_DELTA, payload)
    if xor_zlib:
        xored = (new_bits ^ old_bits).view(torch.uint8).numpy().tobytes()
        packed = zlib.compress(xored, 1)
        if len(packed) < best[0]:
            best = (len(packed), XOR_ZLIB, memoryview(packed))
    spec.encoding = best[1]
    spec.encoded_nbytes = best[0]
    spec.num_changed = changed.numel() if best[1] == SPARSE_DELTA else 0
    return _Encoded(spec, best[2])


def _encode_all(
    state: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor] | None,
    algorithm: str,
    xor_zlib: bool,
) -> list[_Encoded]:
    encoded: list[_Encoded] = []
    for name, tensor in state.items():
        if base is not None:
            if name not in base:
                raise ValueError(f"delta push: {name!r} is not in the base state; send a full push")
            old = base[name]
            if tuple(old.shape) != tuple(tensor.shape) or old.dtype != tensor.dtype:
                raise ValueError(f"delta push: {name!r} changed shape or dtype; send a full push")
            item = _encode_delta(name, tensor, old, algorithm, xor_zlib)
            if item is not None:
                encoded.append(item)
            continue
        raw = tensor_bytes(tensor)
        spec = common_pb2.TensorSpec(
            name=name,
            dtype=tensor_dtype_to_proto(tensor.dtype),
            shape=list(tensor.shape),
            encoding=RAW,
            encoded_nbytes=raw.nbytes,
            checksum=checksum(raw, algorithm),
        )
        encoded.append(_Encoded(spec, raw))
    return encoded


@dataclass
class PushPlan:
    """An encoded push: the manifest and each tensor's payload, ready to stream to any number of
    receivers (encoding and checksums are computed once)."""

    manifest: common_pb2.WeightManifest
    payloads: list[tuple[str, memoryview]]
    chunk_bytes: int = 1 << 20

    def messages(self) -> Iterator[tuple[str, Any]]:
        yield "manifest", self.manifest
        num_chunks = 0
        for name, payload in self.payloads:
            for offset in range(0, payload.nbytes, self.chunk_bytes):
                data = payload[offset : offset + self.chunk_bytes].tobytes()
                yield "chunk", common_pb2.WeightChunk(tensor_name=name, offset=offset, data=data)
                num_chunks += 1
        yield "commit", common_pb2.WeightCommit(num_chunks=num_chunks)


def encode_push(
    state: Mapping[str, torch.Tensor],
    version: int,
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    base_version: int = 0,
    chunk_bytes: int = 1 << 20,
    metadata: Mapping[str, str] | None = None,
    kind: int = FULL,
    lora: common_pb2.LoraAdapterSpec | None = None,
    checksum_algorithm: str = "xxh3_128",
    xor_zlib: bool = False,
    pusher: str = "",
) -> PushPlan:
    """Encodes a push once (see ``iter_push_messages`` for the arguments)."""
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    if base is not None:
        kind = DELTA
    if kind == LORA and lora is None:
        raise ValueError("a LoRA push needs lora=LoraAdapterSpec(adapter_name=..., adapter_config_json=...)")
    encoded = _encode_all(state, base, checksum_algorithm, xor_zlib)
    manifest = common_pb2.WeightManifest(
        version=version,
        kind=kind,
        base_version=base_version if kind == DELTA else 0,
        tensors=[e.spec for e in encoded],
        checksum_algorithm=checksum_algorithm,
        transport=common_pb2.WEIGHT_TRANSPORT_GRPC_STREAM,
        total_encoded_nbytes=sum(e.spec.encoded_nbytes for e in encoded),
        metadata=dict(metadata or {}),
        pusher=pusher,
    )
    if lora is not None:
        manifest.lora.CopyFrom(lora)
    return PushPlan(manifest, [(e.spec.name, e.payload) for e in encoded], chunk_bytes)


def iter_push_messages(
    state: Mapping[str, torch.Tensor],
    version: int,
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    base_version: int = 0,
    chunk_bytes: int = 1 << 20,
    metadata: Mapping[str, str] | None = None,
    kind: int = FULL,
    lora: common_pb2.LoraAdapterSpec | None = None,
    checksum_algorithm: str = "xxh3_128",
    xor_zlib: bool = False,
    pusher: str = "",
) -> Iterator[tuple[str, Any]]:
    """Yields ("manifest", WeightManifest), ("chunk", WeightChunk)..., ("commit", WeightCommit).

    With ``base`` it builds a DELTA against ``base_version``: per tensor the smallest of sparse
    delta / raw (/ XOR+zlib when ``xor_zlib``), bit-identical tensors omitted. ``kind=LORA`` needs
    ``lora`` (adapter name + PEFT config) and ``state`` holding the adapter's tensors.
    """
    yield from encode_push(
        state, version, base=base, base_version=base_version, chunk_bytes=chunk_bytes, metadata=metadata,
        kind=kind, lora=lora, checksum_algorithm=checksum_algorithm, xor_zlib=xor_zlib, pusher=pusher,
    ).messages()  # fmt: skip


def iter_uri_push_messages(
    uri: str,
    version: int,
    *,
    state: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
    kind: int = FULL,
    lora: common_pb2.LoraAdapterSpec | None = None,
    checksum_algorithm: str = "xxh3_128",
) -> Iterator[tuple[str, Any]]:
    """A push whose bytes the receiver reads from ``uri`` (safetensors file or directory on shared
    storage). With ``state`` (what the file holds) the manifest also carries per-tensor checksums."""
    specs = [
        common_pb2.TensorSpec(
            name=name,
            dtype=tensor_dtype_to_proto(t.dtype),
            shape=list(t.shape),
            encoding=RAW,
            checksum=checksum(t, checksum_algorithm),
        )
        for name, t in (state or {}).items()
    ]
    manifest = common_pb2.WeightManifest(
        version=version,
        kind=kind,
        tensors=specs,
        checksum_algorithm=checksum_algorithm,
        transport=common_pb2.WEIGHT_TRANSPORT_URI,
        source_uri=uri,
        metadata=dict(metadata or {}),
    )
    if lora is not None:
        manifest.lora.CopyFrom(lora)
    yield "manifest", manifest
    yield "commit", common_pb2.WeightCommit(num_chunks=0)


def load_uri(uri: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of every ``*.safetensors`` shard in a directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser()
    if "://" in str(uri) and not uri.startswith("file://"):
        raise WeightPushError("bad_uri", f"source_uri={uri!r}: only file:// URIs and paths are supported")
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise WeightPushError("bad_uri", f"source_uri={uri!r}: no safetensors file there")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            loaded = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightPushError(
                "bad_uri", f"source_uri={uri!r}: {file.name} is not safetensors: {exc}"
            ) from exc
        duplicate = tensors.keys() & loaded.keys()
        if duplicate:
            raise WeightPushError("bad_uri", f"source_uri={uri!r}: {sorted(duplicate)[0]!r} in two shards")
        tensors.update(loaded)
    return tensors


# --- receiver ---------------------------------------------------------------------------------


@dataclass
class StagedWeights:
    """A verified push, ready to swap in. For a delta, ``tensors`` holds only the changed tensors,
    fully reconstructed."""

    version: int
    kind: str  # "full" | "delta" | "lora"
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    bytes_received: int
    lora: common_pb2.LoraAdapterSpec | None = None
    base_version: int = 0
    pusher: str = ""
    started_at: float = field(default_factory=time.monotonic)
    # The tensors sit in memory of this push alone (staging buffers, decoded copies), so ``swap_in``
    # may hand that memory to the model instead of copying it. False for a URI push: safetensors
    # may map the file, which must not end up backing the live weights.
    owned: bool = False

    def check_applies_to(self, current_version: int) -> None:
        """Re-checks, at swap time, that this push still applies to what is serving (another push may
        have landed while it was staged); raises WeightPushError."""
        check_version(self.version, self.kind == "delta", self.base_version, current_version)


def check_version(version: int, is_delta: bool, base_version: int, current_version: int) -> None:
    """A push must create a newer version, and a delta must be against the version serving now."""
    if version <= current_version:
        raise WeightPushError(
            "stale_version", f"version {version} is not newer than the serving version {current_version}"
        )
    if is_delta and base_version != current_version:
        raise WeightPushError(
            "base_mismatch",
            f"delta against base_version {base_version}, but version {current_version} is serving: "
            "send a full push or a delta against it",
        )


def swap_in(live: Mapping[str, torch.Tensor], staged: StagedWeights, *, take_over: bool = True) -> int:
    """Puts a verified push's tensors into the ``live`` tensors: the very objects the model reads
    (its Parameters and buffers), by name. Call it between batches, after every check passed.

    A live tensor that is alone on its whole contiguous CPU storage takes over the staged tensor's
    memory (``.data =``, no copy: the staged buffer becomes the live one, and the old storage is
    freed, or returns to the StagingPool, once nothing else holds it). Anything else is copied into
    in place: a GPU tensor, a view into a larger storage (fused weights), a storage that another
    live tensor object shares, a push whose memory is not its own, everything when ``take_over``
    is False (``live`` holds stand-ins sharing the model's storage, not the model's own tensors).
    Either way every holder of a live tensor object sees the new values. Returns the bytes copied."""
    owners: dict[int, set[int]] = {}  # storage -> the live tensor objects on it
    for tensor in live.values():
        owners.setdefault(_storage_ptr(tensor), set()).add(id(tensor))
    alone = {id(t) for t in live.values() if len(owners[_storage_ptr(t)]) == 1}  # before any swap
    copied = 0
    with torch.no_grad():
        for name, tensor in staged.tensors.items():
            target = live[name]
            if take_over and staged.owned and id(target) in alone and _can_take_over(target, tensor):
                target.data = tensor
            else:
                target.copy_(tensor)
                copied += tensor.numel() * tensor.element_size()
    return copied


def _storage_ptr(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() if tensor.device.type == "cpu" else -1


def _can_take_over(target: torch.Tensor, tensor: torch.Tensor) -> bool:
    nbytes = target.numel() * target.element_size()
    return (
        target.device.type == "cpu"
        and tensor.device.type == "cpu"
        and target.dtype == tensor.dtype
        and target.shape == tensor.shape
        and target.is_contiguous()
        and tensor.is_contiguous()
        and target.storage_offset() == 0
        and target.untyped_storage().nbytes() == nbytes
        and nbytes > 0
    )


@dataclass
class _Slot:
    spec: common_pb2.TensorSpec
    dtype: torch.dtype
    shape: tuple[int, ...]
    buffer: memoryview  # writable staging bytes; only the first ``received`` are meaningful
    received: int = 0
    hasher: Any = None  # RAW tensors with a checksum: streaming checksum of the bytes checked so far
    checked: int = 0  # RAW tensors with a checksum: bytes already hashed and finite-checked


class StagingPool:
    """Recycles staging memory between pushes. A receiver stages the same tensor sizes push after
    push, and first-touching fresh pages costs about as much as the transfer itself (the kernel
    faults in and zeroes every page: ~2 GB/s on our VMs). A block comes back to the pool only once
    nothing references a buffer or tensor made from it (``weakref.finalize`` on the numpy view
    they all hold), so reuse never aliases live data; at most ``max_bytes`` are kept idle, the
    oldest size classes evicted first. Blocks are uninitialised: every staged byte is written and
    checksummed before use.

    The finalizer never waits for the lock: it may run inside any allocation, the pool's own locked
    sections included (the cycle collector), on the thread that holds the lock. It only queues the
    block (``deque.append`` is atomic) and moves the queue into the idle lists if the lock is free;
    whoever holds the lock moves it before and after (``_drain``, ``_drain_if_free``)."""

    MIN_BYTES = 1 << 20  # smaller buffers come from the heap without page faults

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._idle: dict[int, list[torch.Tensor]] = {}  # size -> blocks, oldest size class first
        self._idle_bytes = 0
        self._lock = threading.Lock()
        self._returned: deque[torch.Tensor] = deque()  # given back, not yet in _idle

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            self._drain()
            idle = self._idle_bytes
        self._drain_if_free()
        return idle

    def take(self, nbytes: int) -> memoryview:
        """A writable buffer of ``nbytes`` (contents undefined), aligned for any dtype view."""
        block = None
        if nbytes >= self.MIN_BYTES:
            with self._lock:
                self._drain()
                blocks = self._idle.get(nbytes)
                if blocks:
                    block = blocks.pop()
                    self._idle_bytes -= nbytes
            self._drain_if_free()
        if block is None:
            block = torch.empty(nbytes, dtype=torch.uint8)
        array = block.numpy()
        if nbytes >= self.MIN_BYTES:
            weakref.finalize(array, self._give_back, block)
        return array.data.cast("B")

    def _give_back(self, block: torch.Tensor) -> None:
        if block.numel() > self.max_bytes:
            return
        self._returned.append(block)
        self._drain_if_free()

    def _drain_if_free(self) -> None:
        """Drains the returned blocks unless the lock is held: its holder (maybe this very thread,
        in a finalizer run inside its locked section) drains them once it lets go."""
        while self._returned and self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        """Moves the returned blocks into the idle lists, evicting the oldest size classes past
        ``max_bytes``. Call with the lock held."""
        while self._returned:
            block = self._returned.popleft()
            nbytes = block.numel()
            while self._idle_bytes + nbytes > self.max_bytes:
                size, blocks = next(iter(self._idle.items()))
                blocks.pop()
                self._idle_bytes -= size
                if not blocks:
                    del self._idle[size]
            self._idle.setdefault(nbytes, []).append(block)
            self._idle_bytes += nbytes


STAGING_POOL = StagingPool(max_bytes=STAGING_POOL_MAX_BYTES)


def _hasher(algorithm: str) -> Any:
    # The streaming objects release the GIL while hashing (xxhash's one-shot functions do not).
    return hashlib.sha256() if algorithm == "sha256" else xxhash.xxh3_128()


class WeightReceiver:
    """Stages and verifies one push against the live model's tensors (``current``: shapes, dtypes,
    and the base of deltas). Feed it every message of the stream in order, then call ``finish``."""

    def __init__(
        self,
        current: Mapping[str, torch.Tensor],
        current_version: int,
        max_total_bytes: int,
        *,
        side_channel: bool = False,
    ) -> None:
        self.current = current
        self.current_version = current_version
        self.max_total_bytes = max_total_bytes
        self.manifest: common_pb2.WeightManifest | None = None
        self.started_at = time.monotonic()
        self._slots: dict[str, _Slot] = {}
        self._chunks = 0
        self._bytes = 0
        self._committed = False
        # True where the bytes of a TCP push are carried (weight_channel.feed / receive_push). A
        # receiver without it rejects TCP manifests at once, rather than leave the pusher waiting
        # for a side channel nobody offers.
        self.side_channel = side_channel

    @property
    def bytes_received(self) -> int:
        return self._bytes

    def side_channel_buffers(self) -> list[tuple[str, memoryview]]:
        """For a TCP push: each tensor's staging buffer, in manifest order. The side channel writes
        the tensor's encoded bytes into it in order and reports each piece with ``advance``."""
        if self.manifest is None or self.manifest.transport != common_pb2.WEIGHT_TRANSPORT_TCP:
            raise WeightPushError("bad_order", "side-channel bytes without a TCP manifest")
        return [(name, slot.buffer) for name, slot in self._slots.items()]

    def advance(self, name: str, nbytes: int) -> None:
        """Takes the next ``nbytes`` a side channel wrote into ``name``'s staging buffer and
        verifies what it can of them now (a RAW tensor's checksum and finite check run here)."""
        slot = self._slots[name]
        end = slot.received + nbytes
        if nbytes < 0 or end > slot.spec.encoded_nbytes:
            raise WeightPushError(
                "too_large", f"{name}: {end} bytes arrived, beyond its declared {slot.spec.encoded_nbytes}"
            )
        slot.received = end
        self._bytes += nbytes
        self._check_arrived(slot)

    def feed(self, kind: str, message: Any) -> None:
        """Takes one stream message: "manifest", "chunk" or "commit"."""
        if self._committed:
            raise WeightPushError("bad_order", f"{kind} after commit: commit must be the last message")
        if kind == "manifest":
            if self.manifest is not None:
                raise WeightPushError("bad_order", "a second manifest: send exactly one, first")
            self._take_manifest(message)
        elif self.manifest is None:
            raise WeightPushError(
                "bad_order", f"{kind or 'empty message'} before the manifest: send it first"
            )
        elif kind == "chunk":
            self._take_chunk(message)
        elif kind == "commit":
            if message.num_chunks != self._chunks:
                raise WeightPushError(
                    "truncated", f"commit says {message.num_chunks} chunks but {self._chunks} arrived"
                )
            self._committed = True
        else:
            raise WeightPushError("malformed", f"unknown push message {kind!r}")

    # manifest ----------------------------------------------------------------------------------
    def _take_manifest(self, manifest: common_pb2.WeightManifest) -> None:
        kind = manifest.kind or FULL
        if kind not in KIND_NAMES:
            raise WeightPushError("malformed", f"unknown WeightPushKind {manifest.kind}")
        if manifest.checksum_algorithm not in ("", *CHECKSUM_ALGORITHMS):
            raise WeightPushError(
                "malformed", f"checksum_algorithm={manifest.checksum_algorithm!r}: use {CHECKSUM_ALGORITHMS}"
            )
        check_version(manifest.version, kind == DELTA, manifest.base_version, self.current_version)
        if kind == LORA:
            _check_lora_spec(manifest)
        transport = manifest.transport or common_pb2.WEIGHT_TRANSPORT_GRPC_STREAM
        if transport not in _TRANSPORTS or (
            transport == common_pb2.WEIGHT_TRANSPORT_TCP and not self.side_channel
        ):
            supported = "GRPC_STREAM, TCP or URI" if self.side_channel else "GRPC_STREAM or URI"
            raise WeightPushError(
                "malformed", f"transport {transport} is not supported here: use {supported}"
            )
        uri = transport == common_pb2.WEIGHT_TRANSPORT_URI
        if uri and not manifest.source_uri:
            raise WeightPushError("bad_uri", "transport URI needs source_uri")
        specs = list(manifest.tensors)
        self._check_specs(specs, kind, uri)
        declared = sum(s.encoded_nbytes for s in specs)
        if not uri and manifest.total_encoded_nbytes != declared:
            raise WeightPushError(
                "malformed",
                f"total_encoded_nbytes={manifest.total_encoded_nbytes} but tensors add up to {declared}",
            )
        if declared > self.max_total_bytes:
            raise WeightPushError(
                "too_large",
                f"push of {declared} bytes exceeds this receiver's limit of {self.max_total_bytes}",
            )
        self.manifest = manifest
        if not uri:
            algorithm = manifest.checksum_algorithm or "xxh3_128"
            for spec in specs:
                slot = _Slot(spec, proto_to_torch_dtype(spec.dtype), tuple(spec.shape),
                             STAGING_POOL.take(spec.encoded_nbytes))  # fmt: skip
                if spec.encoding in (RAW, 0) and spec.checksum:  # the payload is the result:
                    slot.hasher = _hasher(algorithm)  # verify it as it arrives
                self._slots[spec.name] = slot

    def _check_specs(self, specs: list[common_pb2.TensorSpec], kind: int, uri: bool) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise WeightPushError("malformed", f"tensor {dup!r} listed twice in the manifest")
        if kind == FULL and not (uri and not specs):
            _check_names(set(names), self.current, full=True)
        elif kind == DELTA:
            _check_names(set(names), self.current, full=False)
        for spec in specs:
            if not spec.name:
                raise WeightPushError("malformed", "a tensor without a name")
            dtype = proto_to_torch_dtype(spec.dtype)
            shape = tuple(spec.shape)
            if any(d < 0 for d in shape):
                raise WeightPushError("shape_mismatch", f"{spec.name}: negative dimension in {shape}")
            if kind != LORA:
                _check_like(spec.name, shape, dtype, self.current[spec.name])
            if uri:
                continue
            _check_encoding(spec, kind, shape, dtype)

    # chunks ------------------------------------------------------------------------------------
    def _take_chunk(self, chunk: common_pb2.WeightChunk) -> None:
        transport = self.manifest.transport if self.manifest is not None else 0
        if transport == common_pb2.WEIGHT_TRANSPORT_TCP:
            raise WeightPushError("bad_order", "chunks on a TCP push: the bytes come over the side channel")
        slot = self._slots.get(chunk.tensor_name)
        if slot is None:
            if transport == common_pb2.WEIGHT_TRANSPORT_URI:
                raise WeightPushError("bad_order", "chunks on a URI push: the bytes come from source_uri")
            raise WeightPushError(
                "unknown_tensor", f"chunk for {chunk.tensor_name!r}, which the manifest does not list"
            )
        if chunk.offset != slot.received:
            raise WeightPushError(
                "bad_order",
                f"chunk for {chunk.tensor_name!r} at offset {chunk.offset}, expected {slot.received}: "
                "send each tensor's chunks in order",
            )
        size = len(chunk.data)
        end = slot.received + size
        if end > slot.spec.encoded_nbytes:
            raise WeightPushError(
                "too_large",
                f"chunk for {chunk.tensor_name!r} ends at byte {end}, beyond its declared {slot.spec.encoded_nbytes}",
            )
        slot.buffer[slot.received : end] = chunk.data
        slot.received = end
        self._bytes += size
        self._chunks += 1
        self._check_arrived(slot)

    def _check_arrived(self, slot: _Slot) -> None:
        """Hashes and finite-checks a RAW tensor's newly arrived whole elements; compares the
        checksum as soon as the tensor is complete (a bad tensor fails the push early)."""
        if slot.hasher is None:
            return  # delta encodings (and a RAW tensor without checksum) are verified in finish
        itemsize = slot.dtype.itemsize
        end = slot.received - slot.received % itemsize
        if end > slot.checked:
            piece = slot.buffer[slot.checked : end]
            floats = _NON_FINITE.get(slot.dtype)
            bits = np.frombuffer(piece, dtype=floats[0]) if floats else None
            if not _scan(piece, bits, slot.dtype, slot.hasher):
                raise WeightPushError("non_finite", f"{slot.spec.name}: contains NaN or Inf")
            slot.checked = end
        if slot.checked == slot.spec.encoded_nbytes:
            _compare_checksum(slot.spec.name, slot.hasher.hexdigest(), slot.spec.checksum)

    # finish ------------------------------------------------------------------------------------
    def finish(self) -> StagedWeights:
        """Verifies the complete push and returns the tensors to swap in; raises WeightPushError."""
        manifest = self.manifest
        if manifest is None:
            raise WeightPushError("truncated", "the stream ended before a manifest arrived")
        if not self._committed:
            raise WeightPushError(
                "truncated", f"the stream ended without a commit after {self._chunks} chunks"
            )
        kind = manifest.kind or FULL
        algorithm = manifest.checksum_algorithm or "xxh3_128"
        if manifest.transport == common_pb2.WEIGHT_TRANSPORT_URI:
            tensors = self._finish_uri(manifest, kind, algorithm)
        else:
            tensors = {}
            for name, slot in self._slots.items():
                if slot.received != slot.spec.encoded_nbytes:
                    raise WeightPushError(
                        "truncated", f"{name}: {slot.received} of {slot.spec.encoded_nbytes} bytes arrived"
                    )
                tensor = self._decode(slot, kind)
                if slot.hasher is None:
                    _verify(name, tensor, slot.spec.checksum, algorithm)
                elif slot.checked != slot.spec.encoded_nbytes:  # every byte must have been checked
                    raise WeightPushError("truncated", f"{name}: only {slot.checked} bytes were verified")
                else:  # hashed and finite-checked as the bytes arrived
                    _compare_checksum(name, slot.hasher.hexdigest(), slot.spec.checksum)
                tensors[name] = tensor
                slot.buffer = memoryview(b"")  # the tensor owns (or copied) the bytes now
        return StagedWeights(
            version=manifest.version,
            kind=KIND_NAMES[kind],
            tensors=tensors,
            metadata=dict(manifest.metadata),
            bytes_received=self._bytes,
            lora=manifest.lora if kind == LORA else None,
            base_version=manifest.base_version if kind == DELTA else 0,
            pusher=manifest.pusher,
            started_at=self.started_at,
            owned=manifest.transport != common_pb2.WEIGHT_TRANSPORT_URI,
        )

    def _finish_uri(
        self, manifest: common_pb2.WeightManifest, kind: int, algorithm: str
    ) -> dict[str, torch.Tensor]:
        tensors = load_uri(manifest.source_uri)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > self.max_total_bytes:
            raise WeightPushError(
                "too_large", f"{manifest.source_uri} holds {size} bytes, over {self.max_total_bytes}"
            )
        self._bytes = size
        if kind != LORA:
            _check_names(set(tensors), self.current, full=kind == FULL)
            for name, t in tensors.items():
                _check_like(name, tuple(t.shape), t.dtype, self.current[name])
        specs = {s.name: s for s in manifest.tensors}
        if specs and set(specs) != set(tensors):
            raise WeightPushError(
                "missing_tensor",
                f"the manifest lists {len(specs)} tensors, {manifest.source_uri} holds {len(tensors)}",
            )
        for name, tensor in tensors.items():
            spec = specs.get(name)
            if spec is not None and (
                tuple(spec.shape) != tuple(tensor.shape) or _FROM_PROTO.get(spec.dtype) != tensor.dtype
            ):
                raise WeightPushError("shape_mismatch", f"{name}: the file disagrees with the manifest")
            _verify(name, tensor, spec.checksum if spec else "", algorithm)
        return tensors

    def _decode(self, slot: _Slot, kind: int) -> torch.Tensor:
        spec, name = slot.spec, slot.spec.name
        if spec.encoding in (RAW, 0):
            if not slot.buffer:
                return torch.empty(slot.shape, dtype=slot.dtype)
            return torch.frombuffer(slot.buffer, dtype=slot.dtype).reshape(slot.shape)
        base = self.current[name]
        new_bits = _bits(base).clone()  # (numel,) integer view of the base, then patched
        if spec.encoding == SPARSE_DELTA:
            k = spec.num_changed
            index = (
                torch.frombuffer(slot.buffer, dtype=torch.int64, count=k)
                if k
                else torch.empty(0, dtype=torch.int64)
            )
            if k and (
                int(index[0]) < 0
                or int(index[-1]) >= new_bits.numel()
                or bool((index[1:] <= index[:-1]).any())
            ):
                raise WeightPushError(
                    "malformed", f"{name}: sparse indices must be ascending and within the tensor"
                )
            if k:
                values = torch.frombuffer(slot.buffer, dtype=new_bits.dtype, offset=k * INDEX_BYTES, count=k)
                new_bits[index] = values
        else:  # XOR_ZLIB
            nbytes = new_bits.numel() * new_bits.element_size()
            inflater = zlib.decompressobj()
            try:
                xored = inflater.decompress(bytes(slot.buffer), nbytes + 1)
            except zlib.error as exc:
                raise WeightPushError("malformed", f"{name}: bad zlib stream: {exc}") from exc
            if len(xored) != nbytes or not inflater.eof:
                raise WeightPushError(
                    "malformed", f"{name}: XOR_ZLIB payload does not inflate to {nbytes} bytes"
                )
            new_bits ^= torch.frombuffer(bytearray(xored), dtype=new_bits.dtype)
        return new_bits.view(slot.dtype).reshape(slot.shape)


def _check_names(names: set[str], current: Mapping[str, torch.Tensor], *, full: bool) -> None:
    unknown = sorted(names - current.keys())
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise WeightPushError("unknown_tensor", f"{unknown[0]!r}{more} is not a tensor of the serving model")
    if full:
        missing = sorted(current.keys() - names)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise WeightPushError(
                "missing_tensor", f"a full push must carry every tensor: {missing[0]!r}{more} is missing"
            )


def _check_like(name: str, shape: tuple[int, ...], dtype: torch.dtype, live: torch.Tensor) -> None:
    if shape != tuple(live.shape):
        raise WeightPushError(
            "shape_mismatch", f"{name}: shape {list(shape)}, the model has {list(live.shape)}"
        )
    if dtype != live.dtype:
        raise WeightPushError("dtype_mismatch", f"{name}: dtype {dtype}, the model has {live.dtype}")


def _check_encoding(
    spec: common_pb2.TensorSpec, kind: int, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    nbytes = _nbytes(shape, dtype)
    itemsize = dtype.itemsize
    if spec.encoding in (RAW, 0):
        if spec.encoded_nbytes != nbytes:
            raise WeightPushError(
                "malformed", f"{spec.name}: RAW needs {nbytes} bytes, manifest says {spec.encoded_nbytes}"
            )
    elif spec.encoding in (SPARSE_DELTA, XOR_ZLIB):
        if kind != DELTA:
            raise WeightPushError(
                "malformed", f"{spec.name}: encoding {spec.encoding} is only valid in a DELTA push"
            )
        if spec.encoding == SPARSE_DELTA:
            if not 0 <= spec.num_changed <= nbytes // max(itemsize, 1):
                raise WeightPushError(
                    "malformed", f"{spec.name}: num_changed={spec.num_changed} out of range"
                )
            expected = spec.num_changed * (INDEX_BYTES + itemsize)
            if spec.encoded_nbytes != expected:
                raise WeightPushError(
                    "malformed", f"{spec.name}: SPARSE_DELTA of {spec.num_changed} needs {expected} bytes"
                )
        elif spec.encoded_nbytes <= 0:
            raise WeightPushError("malformed", f"{spec.name}: empty XOR_ZLIB payload")
    else:
        raise WeightPushError("malformed", f"{spec.name}: unknown TensorEncoding {spec.encoding}")
    if not spec.checksum:
        raise WeightPushError("malformed", f"{spec.name}: no checksum")


def _check_lora_spec(manifest: common_pb2.WeightManifest) -> None:
    if not manifest.HasField("lora") or not manifest.lora.adapter_name:
        raise WeightPushError("bad_adapter", "a LoRA push needs lora.adapter_name")
    try:
        config = json.loads(manifest.lora.adapter_config_json or "null")
    except json.JSONDecodeError as exc:
        raise WeightPushError("bad_adapter", f"lora.adapter_config_json is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise WeightPushError(
            "bad_adapter", "lora.adapter_config_json must be a JSON object (PEFT adapter_config)"
        )


def _verify(name: str, tensor: torch.Tensor, expected: str, algorithm: str) -> None:
    if expected:
        _compare_checksum(name, checksum(tensor, algorithm), expected)
    if tensor.is_floating_point() and tensor.numel() and not _all_finite(tensor):
        raise WeightPushError("non_finite", f"{name}: contains NaN or Inf")


def _compare_checksum(name: str, actual: str, expected: str) -> None:
    if expected and actual != expected.lower():
        raise WeightPushError("checksum_mismatch", f"{name}: checksum {actual} != manifest {expected}")


def _all_finite(tensor: torch.Tensor) -> bool:
    """Exact NaN/Inf check of a float tensor, in numpy, single-threaded, a cache-sized block at a
    time: torch's reductions fan out to OpenMP threads, which crawl (~0.3 GB/s) when the cores
    are oversubscribed, as they are on a busy 2-core server."""
    bits = _bits(tensor).numpy()
    return _scan(memoryview(bits).cast("B"), bits, tensor.dtype)


def _scan(data: memoryview, bits: np.ndarray | None, dtype: torch.dtype, hasher: Any = None) -> bool:
    """One pass over ``data`` (whole elements of ``dtype``), a cache-sized block at a time: each
    block goes to ``hasher`` (if any), then, while still in cache, its floats are checked through
    ``bits`` (their signed-integer view; None: no check). Whether every float checked is finite."""
    itemsize = dtype.itemsize
    for start in range(0, data.nbytes, _VERIFY_BLOCK):
        if hasher is not None:
            hasher.update(data[start : start + _VERIFY_BLOCK])
        if bits is not None and not _finite_bits(
            bits[start // itemsize : (start + _VERIFY_BLOCK) // itemsize], dtype
        ):
            return False
    return True


def _finite_bits(bits: np.ndarray, dtype: torch.dtype) -> bool:
    """Whether the floats whose bits ``bits`` (signed integers) holds are all finite. A float is NaN
    or Inf iff its exponent bits are all ones. With the sign bit clear its bits, read as a signed
    integer, are then >= those of +Inf (and every negative float is a negative integer); with the
    sign set, read as unsigned, they are >= those of -Inf (and every positive float is below
    2**(n-1)). So two read-only max reductions (~25 GB/s), no masking pass, no scratch."""
    if not bits.size:
        return True
    _, unsigned, inf, neg_inf = _NON_FINITE[dtype]
    return bool(bits.max() < inf) and bool(bits.view(unsigned).max() < neg_inf)
