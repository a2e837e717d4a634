"""Redis key names and record layouts shared by the services (one place, so they cannot drift).

Completion log (written by the generator for production requests, read by feedback joins):
  ``flywheel:completion:{completion_id}`` — hash, TTL = generator ``completion_ttl_seconds``:
    prompt            text the user sent (after chat template: see prompt_messages)
    prompt_messages   JSON list of {role, content} when the request was chat, else ""
    completion        generated text
    prompt_token_ids  JSON list[int]
    token_ids         JSON list[int] (completion tokens)
    logprobs          JSON list[float], behaviour logprobs of token_ids (sampling distribution)
    policy_version    int
    finish_reason     "eos" | "length" | "stop" | "aborted"
    adapter_name      "" for the base policy
    user_id, session_id   strings ("" when absent)
    metadata          JSON object
    created_at        unix seconds (float)
Production prompts (the learner's prompt pool): stream ``flywheel:prompts`` with fields
  prompt, prompt_messages, completion_id, policy_version, created_at; trimmed approximately to
  PROMPTS_MAXLEN.
"""

from __future__ import annotations

PREFIX = "flywheel:"
PROMPTS_STREAM = PREFIX + "prompts"
PROMPTS_MAXLEN = 100_000
FEEDBACK_STREAM = PREFIX + "feedback"
FEEDBACK_DEAD_LETTER = PREFIX + "feedback:dead"
FEEDBACK_GROUP = "learner"
POLICY = PREFIX + "policy"
POLICY_REGISTRY = PREFIX + "policy:registry"
REWARD_MODEL = PREFIX + "reward_model"


def completion_key(completion_id: str) -> str:
    return f"{PREFIX}completion:{completion_id}"


def idempotency_key(key: str) -> str:
    return f"{PREFIX}idem:{key}"


def rate_limit_key(client: str) -> str:
    return f"{PREFIX}ratelimit:{client}"
