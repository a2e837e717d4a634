"""The completion log: production completions written to Redis so feedback can be joined to exactly
what the user saw (schema: flywheel.common.keys), and their prompts appended to the prompt pool."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from flywheel.common import keys


@dataclass
class LoggedCompletion:
    completion_id: str
    prompt: str
    prompt_messages: list[dict[str, str]] | None
    completion: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    policy_version: int
    finish_reason: str
    adapter_name: str = ""
    user_id: str = ""
    session_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


class CompletionLog:
    """Writes completion hashes (with TTL) and prompt-stream entries in one round trip."""

    def __init__(self, client: Any, ttl_seconds: int) -> None:
        self.client = client
        self.ttl_seconds = ttl_seconds

    def write(self, prompts: list[list[LoggedCompletion]]) -> None:
        """``prompts``: per prompt, its completions. Each prompt enters the prompt stream once,
        under its first completion's id."""
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        for completions in prompts:
            for item in completions:
                key = keys.completion_key(item.completion_id)
                pipe.hset(key, mapping=_record(item, now))
                pipe.expire(key, self.ttl_seconds)
            if completions:
                first = completions[0]
                pipe.xadd(
                    keys.PROMPTS_STREAM,
                    {
                        "prompt": first.prompt,
                        "prompt_messages": _messages(first.prompt_messages),
                        "completion_id": first.completion_id,
                        "policy_version": str(first.policy_version),
                        "created_at": repr(now),
                    },
                    maxlen=keys.PROMPTS_MAXLEN,
                    approximate=True,
                )
        pipe.execute()


def _messages(messages: list[dict[str, str]] | None) -> str:
    return json.dumps(messages) if messages is not None else ""


def _record(item: LoggedCompletion, now: float) -> dict[str, str]:
    return {
        "prompt": item.prompt,
        "prompt_messages": _messages(item.prompt_messages),
        "completion": item.completion,
        "prompt_token_ids": json.dumps(item.prompt_token_ids),
        "token_ids": json.dumps(item.token_ids),
        "logprobs": json.dumps(item.logprobs),
        "policy_version": str(item.policy_version),
        "finish_reason": item.finish_reason,
        "adapter_name": item.adapter_name,
        "user_id": item.user_id,
        "session_id": item.session_id,
        "metadata": json.dumps(item.metadata),
        "created_at": repr(now),
    }
