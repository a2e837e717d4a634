"""Test helper: writes completion-log records exactly as flywheel.common.keys documents them
(the generator's format), so feedback joins can be tested without a generator."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any


def log_completion(
    client: Any,
    prompt: str = "How was the film?",
    completion: str = "It was great.",
    completion_id: str | None = None,
    policy_version: int = 3,
    ttl_seconds: int = 3600,
) -> str:
    """Writes one completion hash with a TTL; returns its completion_id."""
    from flywheel.common import keys

    cid = completion_id or uuid.uuid4().hex
    key = keys.completion_key(cid)
    client.hset(
        key,
        mapping={
            "prompt": prompt,
            "prompt_messages": "",
            "completion": completion,
            "prompt_token_ids": json.dumps([5, 6, 7]),
            "token_ids": json.dumps([11, 12, 13]),
            "logprobs": json.dumps([-0.5, -1.25, -0.125]),
            "policy_version": str(policy_version),
            "finish_reason": "eos",
            "adapter_name": "",
            "user_id": "u1",
            "session_id": "s1",
            "metadata": json.dumps({}),
            "created_at": repr(time.time()),
        },
    )
    client.expire(key, ttl_seconds)
    return cid


def stream_records(client: Any) -> list[Any]:
    """Every record in the feedback stream, oldest first."""
    from flywheel.common import keys
    from flywheel.feedback.records import FeedbackRecord

    return [
        FeedbackRecord.from_json(fields[b"record"], event_id=entry_id.decode())
        for entry_id, fields in client.xrange(keys.FEEDBACK_STREAM)
    ]
