"""Checks a SubmitFeedback batch and turns its protos into :class:`EventDraft` objects.

A malformed event rejects the whole batch: :class:`InvalidBatch` names ``events[i].field`` and the
limit, and the servicer answers INVALID_ARGUMENT before anything touches Redis.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from flywheel.feedback.records import RatingValue, json_number, json_string
from flywheel.v1 import feedback_pb2

MAX_KEY_CHARS = 128
MAX_ID_CHARS = 256
THUMBS: dict[int, str] = {feedback_pb2.THUMB_UP: "up", feedback_pb2.THUMB_DOWN: "down"}


class InvalidBatch(ValueError):
    """A batch (or one of its events) is malformed; the message names the field and the limit."""


@dataclass(frozen=True)
class Limits:
    max_batch_events: int
    max_text_chars: int
    max_metadata_entries: int
    max_metadata_bytes: int


@dataclass(slots=True)
class EventDraft:
    """A validated event before the join: what the client sent, in domain terms."""

    index: int
    kind: str
    idempotency_key: str
    completion_ids: list[str] = field(default_factory=list)
    """Completions to join, in role order (rating/correction: [id]; comparison: [chosen, rejected])."""
    prompt: str = ""
    texts: dict[str, str] = field(default_factory=dict)
    """Inline texts: completion, chosen, rejected, corrected_text."""
    rating: RatingValue | None = None
    user_id: str = ""
    session_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    client_time: float | None = None

    def payload_hash(self) -> str:
        """SHA-256 of everything the client sent except the idempotency key (canonical JSON).

        The canonical JSON is ``json.dumps(body, sort_keys=True, separators=(",", ":"),
        ensure_ascii=False)`` of {kind, completion_ids, prompt, texts, rating (its fields),
        user_id, session_id, metadata, client_time}, written here from parts in sorted key order
        (one call per event on the ingest path). It must never change: stored idempotency keys
        compare against it for ``idempotency_ttl_seconds`` (tests pin it to the json.dumps form)."""
        rating = self.rating
        rating_json = (
            "null"
            if rating is None
            else f'{{"max":{json_number(rating.max)},"min":{json_number(rating.min)},'
            f'"thumb":{"null" if rating.thumb is None else json_string(rating.thumb)},'
            f'"value":{json_number(rating.value)}}}'
        )
        text = (
            f'{{"client_time":{json_number(self.client_time)}'
            f',"completion_ids":[{",".join(map(json_string, self.completion_ids))}]'
            f',"kind":{json_string(self.kind)},"metadata":{_sorted_object(self.metadata)}'
            f',"prompt":{json_string(self.prompt)},"rating":{rating_json}'
            f',"session_id":{json_string(self.session_id)},"texts":{_sorted_object(self.texts)}'
            f',"user_id":{json_string(self.user_id)}}}'
        )
        return hashlib.sha256(text.encode()).hexdigest()


def _sorted_object(mapping: dict[str, str]) -> str:
    """A str → str mapping as json.dumps(sort_keys=True, separators=(",", ":")) writes it."""
    if not mapping:
        return "{}"
    return "{" + ",".join(f"{json_string(k)}:{json_string(v)}" for k, v in sorted(mapping.items())) + "}"


def _text(value: str, where: str, limit: int, required: bool = True) -> str:
    if required and not value:
        raise InvalidBatch(f"{where}: must not be empty")
    if len(value) > limit:
        raise InvalidBatch(f"{where}: {len(value)} characters, limit is {limit} (max_text_chars)")
    return value


def _identifier(value: str, where: str, limit: int = MAX_ID_CHARS) -> str:
    if not value:
        raise InvalidBatch(f"{where}: must not be empty")
    if len(value) > limit:
        raise InvalidBatch(f"{where}: {len(value)} characters, limit is {limit}")
    # The space is the only whitespace character str.isprintable() accepts.
    if not value.isprintable() or " " in value:
        raise InvalidBatch(f"{where}: must be printable and contain no whitespace")
    return value


def _scalar(score: feedback_pb2.ScalarScore, where: str) -> RatingValue:
    values = (score.value, score.min, score.max)
    if not all(math.isfinite(v) for v in values):
        raise InvalidBatch(f"{where}: value, min and max must be finite numbers")
    if not score.min < score.max:
        raise InvalidBatch(f"{where}: min ({score.min}) must be less than max ({score.max})")
    if not score.min <= score.value <= score.max:
        raise InvalidBatch(
            f"{where}.value: {score.value} is outside the declared range [{score.min}, {score.max}]"
        )
    return RatingValue(value=score.value, min=score.min, max=score.max)


def _thumb(thumb: int, where: str) -> RatingValue:
    if thumb not in THUMBS:
        raise InvalidBatch(f"{where}: set THUMB_UP or THUMB_DOWN")
    return RatingValue(thumb=THUMBS[thumb])


def _rating(msg: feedback_pb2.Rating, draft: EventDraft, where: str) -> None:
    draft.completion_ids = [_identifier(msg.completion_id, f"{where}.completion_id")]
    which = msg.WhichOneof("value")
    if which is None:
        raise InvalidBatch(f"{where}.value: set thumb or scalar")
    draft.rating = (
        _thumb(msg.thumb, f"{where}.thumb") if which == "thumb" else _scalar(msg.scalar, f"{where}.scalar")
    )


def _comparison(msg: feedback_pb2.Comparison, draft: EventDraft, where: str, limits: Limits) -> None:
    which = msg.WhichOneof("pair")
    if which == "by_id":
        chosen = _identifier(msg.by_id.chosen_completion_id, f"{where}.by_id.chosen_completion_id")
        rejected = _identifier(msg.by_id.rejected_completion_id, f"{where}.by_id.rejected_completion_id")
        if chosen == rejected:
            raise InvalidBatch(f"{where}.by_id: chosen and rejected are the same completion")
        draft.completion_ids = [chosen, rejected]
    elif which == "inline":
        pair = msg.inline
        draft.prompt = _text(pair.prompt, f"{where}.inline.prompt", limits.max_text_chars)
        draft.texts = {
            "chosen": _text(pair.chosen, f"{where}.inline.chosen", limits.max_text_chars),
            "rejected": _text(pair.rejected, f"{where}.inline.rejected", limits.max_text_chars),
        }
        if pair.chosen == pair.rejected:
            raise InvalidBatch(f"{where}.inline: chosen and rejected are the same text")
    else:
        raise InvalidBatch(f"{where}.pair: set by_id or inline")


def _correction(msg: feedback_pb2.Correction, draft: EventDraft, where: str, limits: Limits) -> None:
    draft.completion_ids = [_identifier(msg.completion_id, f"{where}.completion_id")]
    draft.texts = {
        "corrected_text": _text(msg.corrected_text, f"{where}.corrected_text", limits.max_text_chars)
    }


def _inline_pair(msg: feedback_pb2.InlinePair, draft: EventDraft, where: str, limits: Limits) -> None:
    draft.prompt = _text(msg.prompt, f"{where}.prompt", limits.max_text_chars)
    draft.texts = {"completion": _text(msg.completion, f"{where}.completion", limits.max_text_chars)}
    which = msg.WhichOneof("rating")
    if which == "thumb":
        draft.rating = _thumb(msg.thumb, f"{where}.thumb")
    elif which == "scalar":
        draft.rating = _scalar(msg.scalar, f"{where}.scalar")


def _metadata(event: feedback_pb2.FeedbackEvent, where: str, limits: Limits) -> dict[str, str]:
    if not event.metadata:
        return {}
    if len(event.metadata) > limits.max_metadata_entries:
        raise InvalidBatch(
            f"{where}.metadata: {len(event.metadata)} entries, limit is {limits.max_metadata_entries} "
            "(max_metadata_entries)"
        )
    size = sum(len(k.encode()) + len(v.encode()) for k, v in event.metadata.items())
    if size > limits.max_metadata_bytes:
        raise InvalidBatch(
            f"{where}.metadata: {size} bytes of keys and values, limit is {limits.max_metadata_bytes} "
            "(max_metadata_bytes)"
        )
    if any(not k for k in event.metadata):
        raise InvalidBatch(f"{where}.metadata: keys must not be empty")
    return dict(event.metadata)


def parse_event(event: feedback_pb2.FeedbackEvent, index: int, limits: Limits) -> EventDraft:
    """Validates one event; raises InvalidBatch naming ``events[index].field``."""
    where = f"events[{index}]"
    key = _identifier(event.idempotency_key, f"{where}.idempotency_key", MAX_KEY_CHARS)
    kind = event.WhichOneof("kind")
    if kind is None:
        raise InvalidBatch(f"{where}.kind: set one of rating, comparison, correction, inline_pair")
    draft = EventDraft(index=index, kind=kind, idempotency_key=key)
    if kind == "rating":
        _rating(event.rating, draft, f"{where}.rating")
    elif kind == "comparison":
        _comparison(event.comparison, draft, f"{where}.comparison", limits)
    elif kind == "correction":
        _correction(event.correction, draft, f"{where}.correction", limits)
    else:
        _inline_pair(event.inline_pair, draft, f"{where}.inline_pair", limits)
    if event.user_id:
        draft.user_id = _identifier(event.user_id, f"{where}.user_id")
    if event.session_id:
        draft.session_id = _identifier(event.session_id, f"{where}.session_id")
    draft.metadata = _metadata(event, where, limits)
    if event.HasField("client_time"):
        seconds, nanos = event.client_time.seconds, event.client_time.nanos
        if not (0 <= nanos < 1_000_000_000 and 0 <= seconds < 253402300800):
            raise InvalidBatch(f"{where}.client_time: not a valid timestamp (years 1970..9999)")
        draft.client_time = seconds + nanos / 1e9
    return draft


def parse_batch(request: feedback_pb2.SubmitFeedbackRequest, limits: Limits) -> list[EventDraft]:
    """Validates a whole batch (all or nothing)."""
    count = len(request.events)
    if count == 0:
        raise InvalidBatch("events: the batch is empty; send at least one event")
    if count > limits.max_batch_events:
        raise InvalidBatch(
            f"events: {count} events, limit is {limits.max_batch_events} per call (max_batch_events); "
            "split the batch"
        )
    return [parse_event(event, i, limits) for i, event in enumerate(request.events)]
