"""Retry decisions shared by the sync and async clients (pure functions, no I/O)."""

from __future__ import annotations

import random

import grpc

from flywheel_client.config import RetryPolicy
from flywheel_client.results import FlywheelError

RETRY_AFTER_HEADER = "retry-after-ms"


def retry_after_s(error: grpc.RpcError) -> float | None:
    """The server's ``retry-after-ms`` trailing metadata, in seconds, if any."""
    trailing = getattr(error, "trailing_metadata", None)
    items = trailing() if callable(trailing) else None
    for key, value in items or ():
        if key == RETRY_AFTER_HEADER:
            try:
                return max(0.0, int(value) / 1000.0)
            except (TypeError, ValueError):
                return None
    return None


def backoff_s(policy: RetryPolicy, attempt: int, rng: random.Random | None = None) -> float:
    """Wait before retry number ``attempt`` (1-based): exponential, capped, jittered."""
    base = min(policy.max_backoff_s, policy.initial_backoff_s * policy.multiplier ** (attempt - 1))
    spread = base * policy.jitter
    return max(0.0, base - spread + (rng or random).random() * 2 * spread)


def next_wait_s(
    policy: RetryPolicy, error: grpc.RpcError, attempt: int, codes: tuple[grpc.StatusCode, ...] | None = None
) -> float:
    """Seconds to wait before retrying after ``error`` on attempt ``attempt``; raises FlywheelError
    when the call must not be retried (code not retryable, attempts used up, wait too long)."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (error.details() if callable(getattr(error, "details", None)) else "") or str(error)
    after = retry_after_s(error) if code is grpc.StatusCode.RESOURCE_EXHAUSTED else None
    retryable = code in (policy.retry_codes if codes is None else codes)
    if not retryable or attempt >= policy.max_attempts:
        suffix = f" (after {attempt} attempts)" if retryable else ""
        raise FlywheelError(code, details + suffix, after) from error
    if after is not None:
        if after > policy.max_retry_after_s:
            raise FlywheelError(code, f"{details} (server asks to wait {after:.1f}s)", after) from error
        return after + backoff_s(policy, 1) * policy.jitter
    return backoff_s(policy, attempt)
