import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_DTYPE_UNSPECIFIED: _ClassVar[TensorDtype]
    TENSOR_DTYPE_FLOAT32: _ClassVar[TensorDtype]
    TENSOR_DTYPE_FLOAT16: _ClassVar[TensorDtype]
    TENSOR_DTYPE_BFLOAT16: _ClassVar[TensorDtype]
    TENSOR_DTYPE_FLOAT64: _ClassVar[TensorDtype]
    TENSOR_DTYPE_INT64: _ClassVar[TensorDtype]
    TENSOR_DTYPE_INT32: _ClassVar[TensorDtype]
    TENSOR_DTYPE_INT16: _ClassVar[TensorDtype]
    TENSOR_DTYPE_INT8: _ClassVar[TensorDtype]
    TENSOR_DTYPE_UINT8: _ClassVar[TensorDtype]
    TENSOR_DTYPE_BOOL: _ClassVar[TensorDtype]

class TensorEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_ENCODING_UNSPECIFIED: _ClassVar[TensorEncoding]
    TENSOR_ENCODING_RAW: _ClassVar[TensorEncoding]
    TENSOR_ENCODING_SPARSE_DELTA: _ClassVar[TensorEncoding]
    TENSOR_ENCODING_XOR_ZLIB: _ClassVar[TensorEncoding]

class WeightPushKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEIGHT_PUSH_KIND_UNSPECIFIED: _ClassVar[WeightPushKind]
    WEIGHT_PUSH_KIND_FULL: _ClassVar[WeightPushKind]
    WEIGHT_PUSH_KIND_DELTA: _ClassVar[WeightPushKind]
    WEIGHT_PUSH_KIND_LORA: _ClassVar[WeightPushKind]

class WeightTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEIGHT_TRANSPORT_UNSPECIFIED: _ClassVar[WeightTransport]
    WEIGHT_TRANSPORT_GRPC_STREAM: _ClassVar[WeightTransport]
    WEIGHT_TRANSPORT_URI: _ClassVar[WeightTransport]
    WEIGHT_TRANSPORT_TCP: _ClassVar[WeightTransport]
    WEIGHT_TRANSPORT_NCCL: _ClassVar[WeightTransport]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_ABORTED: _ClassVar[FinishReason]
TENSOR_DTYPE_UNSPECIFIED: TensorDtype
TENSOR_DTYPE_FLOAT32: TensorDtype
TENSOR_DTYPE_FLOAT16: TensorDtype
TENSOR_DTYPE_BFLOAT16: TensorDtype
TENSOR_DTYPE_FLOAT64: TensorDtype
TENSOR_DTYPE_INT64: TensorDtype
TENSOR_DTYPE_INT32: TensorDtype
TENSOR_DTYPE_INT16: TensorDtype
TENSOR_DTYPE_INT8: TensorDtype
TENSOR_DTYPE_UINT8: TensorDtype
TENSOR_DTYPE_BOOL: TensorDtype
TENSOR_ENCODING_UNSPECIFIED: TensorEncoding
TENSOR_ENCODING_RAW: TensorEncoding
TENSOR_ENCODING_SPARSE_DELTA: TensorEncoding
TENSOR_ENCODING_XOR_ZLIB: TensorEncoding
WEIGHT_PUSH_KIND_UNSPECIFIED: WeightPushKind
WEIGHT_PUSH_KIND_FULL: WeightPushKind
WEIGHT_PUSH_KIND_DELTA: WeightPushKind
WEIGHT_PUSH_KIND_LORA: WeightPushKind
WEIGHT_TRANSPORT_UNSPECIFIED: WeightTransport
WEIGHT_TRANSPORT_GRPC_STREAM: WeightTransport
WEIGHT_TRANSPORT_URI: WeightTransport
WEIGHT_TRANSPORT_TCP: WeightTransport
WEIGHT_TRANSPORT_NCCL: WeightTransport
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_ABORTED: FinishReason

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "encoding", "encoded_nbytes", "num_changed", "checksum")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    ENCODED_NBYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHANGED_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: TensorDtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    encoding: TensorEncoding
    encoded_nbytes: int
    num_changed: int
    checksum: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[TensorDtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., encoding: _Optional[_Union[TensorEncoding, str]] = ..., encoded_nbytes: _Optional[int] = ..., num_changed: _Optional[int] = ..., checksum: _Optional[str] = ...) -> None: ...

class LoraAdapterSpec(_message.Message):
    __slots__ = ("adapter_name", "adapter_config_json")
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    adapter_name: str
    adapter_config_json: str
    def __init__(self, adapter_name: _Optional[str] = ..., adapter_config_json: _Optional[str] = ...) -> None: ...

class WeightManifest(_message.Message):
    __slots__ = ("version", "kind", "base_version", "tensors", "checksum_algorithm", "transport", "source_uri", "lora", "total_encoded_nbytes", "metadata", "pusher")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ENCODED_NBYTES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PUSHER_FIELD_NUMBER: _ClassVar[int]
    version: int
    kind: WeightPushKind
    base_version: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    checksum_algorithm: str
    transport: WeightTransport
    source_uri: str
    lora: LoraAdapterSpec
    total_encoded_nbytes: int
    metadata: _containers.ScalarMap[str, str]
    pusher: str
    def __init__(self, version: _Optional[int] = ..., kind: _Optional[_Union[WeightPushKind, str]] = ..., base_version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., checksum_algorithm: _Optional[str] = ..., transport: _Optional[_Union[WeightTransport, str]] = ..., source_uri: _Optional[str] = ..., lora: _Optional[_Union[LoraAdapterSpec, _Mapping]] = ..., total_encoded_nbytes: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., pusher: _Optional[str] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("tensor_name", "offset", "data")
    TENSOR_NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    tensor_name: str
    offset: int
    data: bytes
    def __init__(self, tensor_name: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class WeightCommit(_message.Message):
    __slots__ = ("num_chunks",)
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    num_chunks: int
    def __init__(self, num_chunks: _Optional[int] = ...) -> None: ...

class WeightPushResult(_message.Message):
    __slots__ = ("version", "previous_version", "bytes_received", "tensors_updated", "seconds", "swapped_at")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TENSORS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_AT_FIELD_NUMBER: _ClassVar[int]
    version: int
    previous_version: int
    bytes_received: int
    tensors_updated: int
    seconds: float
    swapped_at: _timestamp_pb2.Timestamp
    def __init__(self, version: _Optional[int] = ..., previous_version: _Optional[int] = ..., bytes_received: _Optional[int] = ..., tensors_updated: _Optional[int] = ..., seconds: _Optional[float] = ..., swapped_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...
