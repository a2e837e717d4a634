"""Builders for feedback events (``FeedbackEvent`` protos) and conversions of replies.

Every builder assigns a fresh idempotency key unless one is given; the key stays with the event
through retries, batching and the spool, so the service stores it at most once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Literal

from flywheel.v1 import common_pb2, feedback_pb2, generator_pb2
from flywheel_client.results import (
    AckStatus,
    EventAck,
    FeedbackStats,
    GeneratedCompletion,
    GenerateResult,
    StreamChunk,
)

Thumb = Literal["up", "down"] | bool
"""'up'/True or 'down'/False."""
FeedbackEvent = feedback_pb2.FeedbackEvent

_ACK = {
    feedback_pb2.EVENT_STATUS_ACCEPTED: AckStatus.ACCEPTED,
    feedback_pb2.EVENT_STATUS_DUPLICATE: AckStatus.DUPLICATE,
    feedback_pb2.EVENT_STATUS_UNKNOWN_COMPLETION: AckStatus.UNKNOWN_COMPLETION,
}
_FINISH = {
    common_pb2.FINISH_REASON_EOS: "eos",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_ABORTED: "aborted",
}
PURPOSES = {
    "production": generator_pb2.REQUEST_PURPOSE_PRODUCTION,
    "rollout": generator_pb2.REQUEST_PURPOSE_ROLLOUT,
    "evaluation": generator_pb2.REQUEST_PURPOSE_EVALUATION,
}


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def _thumb(value: Thumb) -> feedback_pb2.Thumb:
    if value in ("up", True):
        return feedback_pb2.THUMB_UP
    if value in ("down", False):
        return feedback_pb2.THUMB_DOWN
    raise ValueError(f"thumb={value!r}: use 'up', 'down', True or False")


def _scalar(score: float, score_range: tuple[float, float]) -> feedback_pb2.ScalarScore:
    low, high = score_range
    return feedback_pb2.ScalarScore(value=score, min=low, max=high)


def _envelope(
    idempotency_key: str | None,
    user_id: str,
    session_id: str,
    metadata: Mapping[str, str] | None,
    client_time: float | None,
) -> FeedbackEvent:
    event = FeedbackEvent(
        idempotency_key=idempotency_key or new_idempotency_key(),
        user_id=user_id,
        session_id=session_id,
        metadata=dict(metadata or {}),
    )
    event.client_time.FromNanoseconds(int((time.time() if client_time is None else client_time) * 1e9))
    return event


def rating(
    completion_id: str,
    thumb: Thumb | None = None,
    score: float | None = None,
    score_range: tuple[float, float] = (1.0, 5.0),
    *,
    idempotency_key: str | None = None,
    user_id: str = "",
    session_id: str = "",
    metadata: Mapping[str, str] | None = None,
    client_time: float | None = None,
) -> FeedbackEvent:
    """A thumb or a ``score`` within ``score_range`` for a logged completion."""
    if (thumb is None) == (score is None):
        raise ValueError("rating: pass exactly one of thumb or score")
    event = _envelope(idempotency_key, user_id, session_id, metadata, client_time)
    if thumb is not None:
        event.rating.CopyFrom(feedback_pb2.Rating(completion_id=completion_id, thumb=_thumb(thumb)))
    else:
        assert score is not None
        event.rating.CopyFrom(
            feedback_pb2.Rating(completion_id=completion_id, scalar=_scalar(score, score_range))
        )
    return event


def comparison(
    chosen: str,
    rejected: str,
    prompt: str | None = None,
    *,
    idempotency_key: str | None = None,
    user_id: str = "",
    session_id: str = "",
    metadata: Mapping[str, str] | None = None,
    client_time: float | None = None,
) -> FeedbackEvent:
    """``chosen`` preferred over ``rejected``: completion ids when ``prompt`` is None, else texts."""
    event = _envelope(idempotency_key, user_id, session_id, metadata, client_time)
    if prompt is None:
        pair = feedback_pb2.CompletionIdPair(chosen_completion_id=chosen, rejected_completion_id=rejected)
        event.comparison.by_id.CopyFrom(pair)
    else:
        event.comparison.inline.CopyFrom(
            feedback_pb2.TextPair(prompt=prompt, chosen=chosen, rejected=rejected)
        )
    return event


def correction(
    completion_id: str,
    corrected_text: str,
    *,
    idempotency_key: str | None = None,
    user_id: str = "",
    session_id: str = "",
    metadata: Mapping[str, str] | None = None,
    client_time: float | None = None,
) -> FeedbackEvent:
    """The user's better response to a logged completion."""
    event = _envelope(idempotency_key, user_id, session_id, metadata, client_time)
    event.correction.CopyFrom(
        feedback_pb2.Correction(completion_id=completion_id, corrected_text=corrected_text)
    )
    return event


def interaction(
    prompt: str,
    completion: str,
    thumb: Thumb | None = None,
    score: float | None = None,
    score_range: tuple[float, float] = (1.0, 5.0),
    *,
    idempotency_key: str | None = None,
    user_id: str = "",
    session_id: str = "",
    metadata: Mapping[str, str] | None = None,
    client_time: float | None = None,
) -> FeedbackEvent:
    """A (prompt, completion) produced outside Flywheel, optionally rated."""
    if thumb is not None and score is not None:
        raise ValueError("interaction: pass at most one of thumb or score")
    event = _envelope(idempotency_key, user_id, session_id, metadata, client_time)
    pair = feedback_pb2.InlinePair(prompt=prompt, completion=completion)
    if thumb is not None:
        pair.thumb = _thumb(thumb)
    elif score is not None:
        pair.scalar.CopyFrom(_scalar(score, score_range))
    event.inline_pair.CopyFrom(pair)
    return event


def ensure_key(event: FeedbackEvent) -> FeedbackEvent:
    if not event.idempotency_key:
        event.idempotency_key = new_idempotency_key()
    return event


def to_acks(response: feedback_pb2.SubmitFeedbackResponse) -> list[EventAck]:
    return [
        EventAck(r.idempotency_key, _ACK.get(r.status, AckStatus.UNKNOWN_COMPLETION), r.event_id, r.message)
        for r in response.results
    ]


def to_stats(reply: feedback_pb2.GetFeedbackStatsResponse) -> FeedbackStats:
    return FeedbackStats(
        dict(reply.accepted_by_kind),
        reply.stream_length,
        reply.consumer_lag,
        reply.pending,
        reply.oldest_unconsumed_age_seconds,
        reply.dead_letter_length,
    )


def generate_request(
    prompts: str | list[str],
    *,
    n: int = 1,
    max_new_tokens: int = 128,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    stop: list[str] | None = None,
    seed: int | None = None,
    purpose: str = "production",
    user_id: str = "",
    session_id: str = "",
    metadata: Mapping[str, str] | None = None,
) -> generator_pb2.GenerateRequest:
    if purpose not in PURPOSES:
        raise ValueError(f"purpose={purpose!r}: use one of {', '.join(PURPOSES)}")
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    sampling = generator_pb2.SamplingParams(n=n, top_k=top_k, max_new_tokens=max_new_tokens, stop=stop or [])
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    return generator_pb2.GenerateRequest(
        prompts=[generator_pb2.Prompt(prompt_id=str(i), text=t) for i, t in enumerate(texts)],
        sampling=sampling,
        purpose=PURPOSES[purpose],
        user_id=user_id,
        session_id=session_id,
        metadata=dict(metadata or {}),
    )


def to_generate_results(reply: generator_pb2.GenerateResponse) -> list[GenerateResult]:
    return [
        GenerateResult(
            prompt_id=r.prompt_id,
            prompt_token_ids=list(r.prompt_token_ids),
            completions=[
                GeneratedCompletion(
                    completion_id=c.completion_id,
                    text=c.text,
                    token_ids=list(c.token_ids),
                    logprobs=list(c.logprobs),
                    finish_reason=_FINISH.get(c.finish_reason, ""),
                    policy_version=c.policy_version,
                    logged=c.logged,
                )
                for c in r.completions
            ],
        )
        for r in reply.results
    ]


def to_chunk(reply: generator_pb2.GenerateStreamResponse) -> StreamChunk:
    return StreamChunk(
        reply.completion_id,
        reply.text_delta,
        list(reply.token_ids),
        list(reply.logprobs),
        _FINISH.get(reply.finish_reason, ""),
        reply.policy_version,
    )
