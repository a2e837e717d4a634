import datetime

from flywheel.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreSample(_message.Message):
    __slots__ = ("sample_id", "prompt", "completion")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    prompt: str
    completion: str
    def __init__(self, sample_id: _Optional[str] = ..., prompt: _Optional[str] = ..., completion: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("samples", "scorer")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[ScoreSample]
    scorer: str
    def __init__(self, samples: _Optional[_Iterable[_Union[ScoreSample, _Mapping]]] = ..., scorer: _Optional[str] = ...) -> None: ...

class SampleScore(_message.Message):
    __slots__ = ("sample_id", "reward", "raw_reward", "components")
    class ComponentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    RAW_REWARD_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    reward: float
    raw_reward: float
    components: _containers.ScalarMap[str, float]
    def __init__(self, sample_id: _Optional[str] = ..., reward: _Optional[float] = ..., raw_reward: _Optional[float] = ..., components: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RewardNormalization(_message.Message):
    __slots__ = ("enabled", "mean", "std", "clip", "count")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    mean: float
    std: float
    clip: float
    count: int
    def __init__(self, enabled: _Optional[bool] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., clip: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "model_version", "normalization")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[SampleScore]
    model_version: int
    normalization: RewardNormalization
    def __init__(self, scores: _Optional[_Iterable[_Union[SampleScore, _Mapping]]] = ..., model_version: _Optional[int] = ..., normalization: _Optional[_Union[RewardNormalization, _Mapping]] = ...) -> None: ...

class RewardServicePushWeightsRequest(_message.Message):
    __slots__ = ("manifest", "chunk", "commit")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    manifest: _common_pb2.WeightManifest
    chunk: _common_pb2.WeightChunk
    commit: _common_pb2.WeightCommit
    def __init__(self, manifest: _Optional[_Union[_common_pb2.WeightManifest, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.WeightChunk, _Mapping]] = ..., commit: _Optional[_Union[_common_pb2.WeightCommit, _Mapping]] = ...) -> None: ...

class RewardServicePushWeightsResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _common_pb2.WeightPushResult
    def __init__(self, result: _Optional[_Union[_common_pb2.WeightPushResult, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScorerInfo(_message.Message):
    __slots__ = ("name", "kind", "weight", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    weight: float
    source: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., weight: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model_version", "model_id", "scorers", "last_push_time", "normalization", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SCORERS_FIELD_NUMBER: _ClassVar[int]
    LAST_PUSH_TIME_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    model_id: str
    scorers: _containers.RepeatedCompositeFieldContainer[ScorerInfo]
    last_push_time: _timestamp_pb2.Timestamp
    normalization: RewardNormalization
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, model_version: _Optional[int] = ..., model_id: _Optional[str] = ..., scorers: _Optional[_Iterable[_Union[ScorerInfo, _Mapping]]] = ..., last_push_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., normalization: _Optional[_Union[RewardNormalization, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...
