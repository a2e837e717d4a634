import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Thumb(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THUMB_UNSPECIFIED: _ClassVar[Thumb]
    THUMB_UP: _ClassVar[Thumb]
    THUMB_DOWN: _ClassVar[Thumb]

class EventStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_STATUS_UNSPECIFIED: _ClassVar[EventStatus]
    EVENT_STATUS_ACCEPTED: _ClassVar[EventStatus]
    EVENT_STATUS_DUPLICATE: _ClassVar[EventStatus]
    EVENT_STATUS_UNKNOWN_COMPLETION: _ClassVar[EventStatus]
THUMB_UNSPECIFIED: Thumb
THUMB_UP: Thumb
THUMB_DOWN: Thumb
EVENT_STATUS_UNSPECIFIED: EventStatus
EVENT_STATUS_ACCEPTED: EventStatus
EVENT_STATUS_DUPLICATE: EventStatus
EVENT_STATUS_UNKNOWN_COMPLETION: EventStatus

class ScalarScore(_message.Message):
    __slots__ = ("value", "min", "max")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    value: float
    min: float
    max: float
    def __init__(self, value: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class Rating(_message.Message):
    __slots__ = ("completion_id", "thumb", "scalar")
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    THUMB_FIELD_NUMBER: _ClassVar[int]
    SCALAR_FIELD_NUMBER: _ClassVar[int]
    completion_id: str
    thumb: Thumb
    scalar: ScalarScore
    def __init__(self, completion_id: _Optional[str] = ..., thumb: _Optional[_Union[Thumb, str]] = ..., scalar: _Optional[_Union[ScalarScore, _Mapping]] = ...) -> None: ...

class CompletionIdPair(_message.Message):
    __slots__ = ("chosen_completion_id", "rejected_completion_id")
    CHOSEN_COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    REJECTED_COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    chosen_completion_id: str
    rejected_completion_id: str
    def __init__(self, chosen_completion_id: _Optional[str] = ..., rejected_completion_id: _Optional[str] = ...) -> None: ...

class TextPair(_message.Message):
    __slots__ = ("prompt", "chosen", "rejected")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chosen: str
    rejected: str
    def __init__(self, prompt: _Optional[str] = ..., chosen: _Optional[str] = ..., rejected: _Optional[str] = ...) -> None: ...

class Comparison(_message.Message):
    __slots__ = ("by_id", "inline")
    BY_ID_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    by_id: CompletionIdPair
    inline: TextPair
    def __init__(self, by_id: _Optional[_Union[CompletionIdPair, _Mapping]] = ..., inline: _Optional[_Union[TextPair, _Mapping]] = ...) -> None: ...

class Correction(_message.Message):
    __slots__ = ("completion_id", "corrected_text")
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    CORRECTED_TEXT_FIELD_NUMBER: _ClassVar[int]
    completion_id: str
    corrected_text: str
    def __init__(self, completion_id: _Optional[str] = ..., corrected_text: _Optional[str] = ...) -> None: ...

class InlinePair(_message.Message):
    __slots__ = ("prompt", "completion", "thumb", "scalar")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    THUMB_FIELD_NUMBER: _ClassVar[int]
    SCALAR_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completion: str
    thumb: Thumb
    scalar: ScalarScore
    def __init__(self, prompt: _Optional[str] = ..., completion: _Optional[str] = ..., thumb: _Optional[_Union[Thumb, str]] = ..., scalar: _Optional[_Union[ScalarScore, _Mapping]] = ...) -> None: ...

class FeedbackEvent(_message.Message):
    __slots__ = ("idempotency_key", "rating", "comparison", "correction", "inline_pair", "user_id", "session_id", "metadata", "client_time")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_FIELD_NUMBER: _ClassVar[int]
    INLINE_PAIR_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TIME_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    rating: Rating
    comparison: Comparison
    correction: Correction
    inline_pair: InlinePair
    user_id: str
    session_id: str
    metadata: _containers.ScalarMap[str, str]
    client_time: _timestamp_pb2.Timestamp
    def __init__(self, idempotency_key: _Optional[str] = ..., rating: _Optional[_Union[Rating, _Mapping]] = ..., comparison: _Optional[_Union[Comparison, _Mapping]] = ..., correction: _Optional[_Union[Correction, _Mapping]] = ..., inline_pair: _Optional[_Union[InlinePair, _Mapping]] = ..., user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., client_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SubmitFeedbackRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[FeedbackEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[FeedbackEvent, _Mapping]]] = ...) -> None: ...

class EventResult(_message.Message):
    __slots__ = ("idempotency_key", "status", "event_id", "message")
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    status: EventStatus
    event_id: str
    message: str
    def __init__(self, idempotency_key: _Optional[str] = ..., status: _Optional[_Union[EventStatus, str]] = ..., event_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class SubmitFeedbackResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EventResult]
    def __init__(self, results: _Optional[_Iterable[_Union[EventResult, _Mapping]]] = ...) -> None: ...

class GetFeedbackStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetFeedbackStatsResponse(_message.Message):
    __slots__ = ("accepted_by_kind", "stream_length", "consumer_lag", "pending", "oldest_unconsumed_age_seconds", "dead_letter_length")
    class AcceptedByKindEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ACCEPTED_BY_KIND_FIELD_NUMBER: _ClassVar[int]
    STREAM_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_LAG_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    OLDEST_UNCONSUMED_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTER_LENGTH_FIELD_NUMBER: _ClassVar[int]
    accepted_by_kind: _containers.ScalarMap[str, int]
    stream_length: int
    consumer_lag: int
    pending: int
    oldest_unconsumed_age_seconds: float
    dead_letter_length: int
    def __init__(self, accepted_by_kind: _Optional[_Mapping[str, int]] = ..., stream_length: _Optional[int] = ..., consumer_lag: _Optional[int] = ..., pending: _Optional[int] = ..., oldest_unconsumed_age_seconds: _Optional[float] = ..., dead_letter_length: _Optional[int] = ...) -> None: ...
