"""Joins validated events with the generator's completion log (keys.completion_key hashes).

Two implementations of one join: :func:`record_parts` prepares each event for the join inside Redis
(flywheel.feedback.join_script, the fast path); :func:`build_record` joins in Python, for the rare
logged values the script leaves to it. Both give the same record JSON.
"""

from __future__ import annotations

import json
import time
from typing import Any

from flywheel.feedback.records import (
    SCHEMA_VERSION,
    CompletionRecord,
    FeedbackRecord,
    RatingValue,
    json_number,
    json_string,
)
from flywheel.feedback.validation import EventDraft, InvalidBatch

LoggedCompletion = dict[str, Any]
"""A decoded completion-log hash (see flywheel.common.keys)."""


def decode_completion(raw: dict[bytes, bytes]) -> LoggedCompletion | None:
    """Decodes a completion-log hash; None when the hash is missing (unknown or expired)."""
    if not raw:
        return None
    data = {k.decode(): v.decode() for k, v in raw.items()}
    messages = data.get("prompt_messages") or ""
    return {
        "completion_id": "",
        "prompt": data.get("prompt", ""),
        "prompt_messages": json.loads(messages) if messages else None,
        "prompt_token_ids": json.loads(data.get("prompt_token_ids") or "[]"),
        "text": data.get("completion", ""),
        "token_ids": json.loads(data.get("token_ids") or "[]"),
        "logprobs": json.loads(data.get("logprobs") or "[]"),
        "policy_version": int(data["policy_version"]) if data.get("policy_version") else None,
        "finish_reason": data.get("finish_reason", ""),
        "adapter_name": data.get("adapter_name", ""),
        "created_at": float(data["created_at"]) if data.get("created_at") else None,
    }


def _completion(completion_id: str, logged: LoggedCompletion) -> CompletionRecord:
    return CompletionRecord(
        text=logged["text"],
        completion_id=completion_id,
        token_ids=logged["token_ids"],
        behaviour_logprobs=logged["logprobs"],
        policy_version=logged["policy_version"],
        finish_reason=logged["finish_reason"],
        adapter_name=logged["adapter_name"],
        logged_at=logged["created_at"],
    )


def missing_completions(draft: EventDraft, logged: dict[str, LoggedCompletion | None]) -> list[str]:
    return [cid for cid in draft.completion_ids if logged.get(cid) is None]


def _different_prompts(where: str, chosen_id: str, rejected_id: str) -> InvalidBatch:
    return InvalidBatch(
        f"{where}.by_id: completions {chosen_id!r} and {rejected_id!r} answer different prompts; "
        "a comparison needs two completions of the same prompt"
    )


def _identical_correction(where: str) -> InvalidBatch:
    return InvalidBatch(f"{where}.corrected_text: identical to the logged completion")


def rejected_join(draft: EventDraft, reason: str) -> InvalidBatch:
    """The error for a join the Redis script rejected (reason 'prompts' or 'identical')."""
    where = f"events[{draft.index}].{draft.kind}"
    if reason == "prompts":
        return _different_prompts(where, *draft.completion_ids)
    return _identical_correction(where)


def record_parts(draft: EventDraft, client: str, now: float) -> tuple[str, str]:
    """(head, tail) of ``draft``'s record JSON around the joined fields, which the join script
    splices in: ``"prompt"`` through ``"rejected"``. An event without completions is whole: (record, "").

    Written from parts (one call per event on the ingest path) rather than through
    ``FeedbackRecord.to_json``; the text is the same, field for field (tests compare the two)."""
    head = (
        f'{{"kind":{json_string(draft.kind)},"idempotency_key":{json_string(draft.idempotency_key)},'
        f'"client":{json_string(client)},'
    )
    corrected = draft.texts.get("corrected_text")
    metadata = (
        json.dumps(draft.metadata, separators=(",", ":"), ensure_ascii=False) if draft.metadata else "{}"
    )
    tail = (
        f',"corrected_text":{"null" if corrected is None else json_string(corrected)}'
        f',"rating":{_rating_json(draft.rating)},"user_id":{json_string(draft.user_id)}'
        f',"session_id":{json_string(draft.session_id)},"metadata":{metadata}'
        f',"client_time":{json_number(draft.client_time)},"received_at":{json_number(now)}'
        f',"schema_version":{SCHEMA_VERSION}}}'
    )
    if draft.completion_ids:
        return head, tail
    prompt = f'"prompt":{json_string(draft.prompt)},"prompt_messages":null,"prompt_token_ids":[]'
    if draft.kind == "comparison":
        chosen = _inline_completion(draft.texts["chosen"])
        rejected = _inline_completion(draft.texts["rejected"])
        return f'{head}{prompt},"completion":null,"chosen":{chosen},"rejected":{rejected}{tail}', ""
    if draft.kind == "inline_pair":
        completion = _inline_completion(draft.texts["completion"])
        return f'{head}{prompt},"completion":{completion},"chosen":null,"rejected":null{tail}', ""
    return build_record(draft, client, {}, now).to_json(), ""  # not produced by validation


def _inline_completion(text: str) -> str:
    """``CompletionRecord(text=text)``'s JSON."""
    return (
        f'{{"text":{json_string(text)},"completion_id":"","token_ids":[],"behaviour_logprobs":[],'
        '"policy_version":null,"finish_reason":"","adapter_name":"","logged_at":null}'
    )


def _rating_json(rating: RatingValue | None) -> str:
    if rating is None:
        return "null"
    thumb = "null" if rating.thumb is None else json_string(rating.thumb)
    return (
        f'{{"thumb":{thumb},"value":{json_number(rating.value)},"min":{json_number(rating.min)},'
        f'"max":{json_number(rating.max)}}}'
    )


def build_record(
    draft: EventDraft, client: str, logged: dict[str, LoggedCompletion | None], now: float | None = None
) -> FeedbackRecord:
    """The joined record for ``draft``; every completion it names must be in ``logged``.
    Raises InvalidBatch when the join shows the event makes no sense (a comparison of completions
    of different prompts, a correction identical to the original)."""
    where = f"events[{draft.index}].{draft.kind}"
    fields: dict[str, Any] = {}
    prompt, messages, prompt_ids = draft.prompt, None, []
    if draft.completion_ids:
        first = logged[draft.completion_ids[0]]
        assert first is not None
        prompt, messages, prompt_ids = first["prompt"], first["prompt_messages"], first["prompt_token_ids"]
    if draft.kind == "comparison" and draft.completion_ids:
        chosen_id, rejected_id = draft.completion_ids
        chosen, rejected = logged[chosen_id], logged[rejected_id]
        assert chosen is not None and rejected is not None
        if (chosen["prompt"], chosen["prompt_messages"]) != (rejected["prompt"], rejected["prompt_messages"]):
            raise _different_prompts(where, chosen_id, rejected_id)
        fields["chosen"], fields["rejected"] = (
            _completion(chosen_id, chosen),
            _completion(rejected_id, rejected),
        )
    elif draft.kind == "comparison":
        fields["chosen"] = CompletionRecord(text=draft.texts["chosen"])
        fields["rejected"] = CompletionRecord(text=draft.texts["rejected"])
    elif draft.kind == "inline_pair":
        fields["completion"] = CompletionRecord(text=draft.texts["completion"])
    else:  # rating, correction: one logged completion
        original = logged[draft.completion_ids[0]]
        assert original is not None
        fields["completion"] = _completion(draft.completion_ids[0], original)
        if draft.kind == "correction":
            if draft.texts["corrected_text"] == original["text"]:
                raise _identical_correction(where)
            fields["corrected_text"] = draft.texts["corrected_text"]
    return FeedbackRecord(
        kind=draft.kind,
        idempotency_key=draft.idempotency_key,
        client=client,
        prompt=prompt,
        prompt_messages=messages,
        prompt_token_ids=prompt_ids,
        rating=draft.rating,
        user_id=draft.user_id,
        session_id=draft.session_id,
        metadata=draft.metadata,
        client_time=draft.client_time,
        received_at=time.time() if now is None else now,
        **fields,
    )
