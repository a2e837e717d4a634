import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LearnerPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEARNER_PHASE_UNSPECIFIED: _ClassVar[LearnerPhase]
    LEARNER_PHASE_STARTING: _ClassVar[LearnerPhase]
    LEARNER_PHASE_GENERATING: _ClassVar[LearnerPhase]
    LEARNER_PHASE_SCORING: _ClassVar[LearnerPhase]
    LEARNER_PHASE_TRAINING: _ClassVar[LearnerPhase]
    LEARNER_PHASE_PUSHING: _ClassVar[LearnerPhase]
    LEARNER_PHASE_CHECKPOINTING: _ClassVar[LearnerPhase]
    LEARNER_PHASE_FITTING_REWARD_MODEL: _ClassVar[LearnerPhase]
    LEARNER_PHASE_PAUSED: _ClassVar[LearnerPhase]
    LEARNER_PHASE_WAITING: _ClassVar[LearnerPhase]
    LEARNER_PHASE_IDLE: _ClassVar[LearnerPhase]
LEARNER_PHASE_UNSPECIFIED: LearnerPhase
LEARNER_PHASE_STARTING: LearnerPhase
LEARNER_PHASE_GENERATING: LearnerPhase
LEARNER_PHASE_SCORING: LearnerPhase
LEARNER_PHASE_TRAINING: LearnerPhase
LEARNER_PHASE_PUSHING: LearnerPhase
LEARNER_PHASE_CHECKPOINTING: LearnerPhase
LEARNER_PHASE_FITTING_REWARD_MODEL: LearnerPhase
LEARNER_PHASE_PAUSED: LearnerPhase
LEARNER_PHASE_WAITING: LearnerPhase
LEARNER_PHASE_IDLE: LearnerPhase

class LearnerStatus(_message.Message):
    __slots__ = ("step", "policy_version", "phase", "paused", "algorithm", "last_metrics", "run_dir", "last_checkpoint_path", "last_checkpoint_time", "reward_model_version", "waiting_reason")
    class LastMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    LAST_METRICS_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_TIME_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WAITING_REASON_FIELD_NUMBER: _ClassVar[int]
    step: int
    policy_version: int
    phase: LearnerPhase
    paused: bool
    algorithm: str
    last_metrics: _containers.ScalarMap[str, float]
    run_dir: str
    last_checkpoint_path: str
    last_checkpoint_time: _timestamp_pb2.Timestamp
    reward_model_version: int
    waiting_reason: str
    def __init__(self, step: _Optional[int] = ..., policy_version: _Optional[int] = ..., phase: _Optional[_Union[LearnerPhase, str]] = ..., paused: _Optional[bool] = ..., algorithm: _Optional[str] = ..., last_metrics: _Optional[_Mapping[str, float]] = ..., run_dir: _Optional[str] = ..., last_checkpoint_path: _Optional[str] = ..., last_checkpoint_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reward_model_version: _Optional[int] = ..., waiting_reason: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: LearnerStatus
    def __init__(self, status: _Optional[_Union[LearnerStatus, _Mapping]] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class PauseResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: LearnerStatus
    def __init__(self, status: _Optional[_Union[LearnerStatus, _Mapping]] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: LearnerStatus
    def __init__(self, status: _Optional[_Union[LearnerStatus, _Mapping]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("path", "step", "policy_version")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    path: str
    step: int
    policy_version: int
    def __init__(self, path: _Optional[str] = ..., step: _Optional[int] = ..., policy_version: _Optional[int] = ...) -> None: ...

class PolicyRecord(_message.Message):
    __slots__ = ("version", "parent_version", "step", "reward_model_version", "checkpoint_uri", "created_at", "metrics", "data_window", "current", "restored_from_version", "promoted", "reason", "restorable")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_URI_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    DATA_WINDOW_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESTORABLE_FIELD_NUMBER: _ClassVar[int]
    version: int
    parent_version: int
    step: int
    reward_model_version: int
    checkpoint_uri: str
    created_at: _timestamp_pb2.Timestamp
    metrics: _containers.ScalarMap[str, float]
    data_window: str
    current: bool
    restored_from_version: int
    promoted: bool
    reason: str
    restorable: bool
    def __init__(self, version: _Optional[int] = ..., parent_version: _Optional[int] = ..., step: _Optional[int] = ..., reward_model_version: _Optional[int] = ..., checkpoint_uri: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., data_window: _Optional[str] = ..., current: _Optional[bool] = ..., restored_from_version: _Optional[int] = ..., promoted: _Optional[bool] = ..., reason: _Optional[str] = ..., restorable: _Optional[bool] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[PolicyRecord]
    def __init__(self, policies: _Optional[_Iterable[_Union[PolicyRecord, _Mapping]]] = ...) -> None: ...

class RollbackPolicyRequest(_message.Message):
    __slots__ = ("version", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    reason: str
    def __init__(self, version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RollbackPolicyResponse(_message.Message):
    __slots__ = ("new_policy_version", "restored_from_version")
    NEW_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    new_policy_version: int
    restored_from_version: int
    def __init__(self, new_policy_version: _Optional[int] = ..., restored_from_version: _Optional[int] = ...) -> None: ...

class PromotePolicyRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class PromotePolicyResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: PolicyRecord
    def __init__(self, policy: _Optional[_Union[PolicyRecord, _Mapping]] = ...) -> None: ...
