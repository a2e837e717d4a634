"""Feedback ingestion on Redis: rate limits, joins, idempotent durable appends, stats. No gRPC here.

Durability guarantee (what an acknowledgement means)
----------------------------------------------------
An event is acknowledged (ACCEPTED, or DUPLICATE pointing at the original) only after the Lua
script that appends it to the stream ``flywheel:feedback`` has returned, i.e. the entry is in
Redis' memory and in the AOF buffer that Redis writes to the AOF file before it replies.

* ``durability: everysec`` (default; Redis ``appendfsync everysec``): an acknowledged event
  survives a crash or ``kill -9`` of the feedback service and of the Redis *process* (the AOF
  write has reached the kernel). A crash of the whole machine/OS or a power loss can lose the
  events acknowledged in the last ~1 s (up to 2 s when the disk stalls) before Redis' fsync.
* ``durability: always``: acknowledgement waits until the entry is fsynced to the AOF on the Redis
  primary. On Redis >= 7.2 we call ``WAITAOF 1 0 <timeout>`` after each append (the call fails
  with UNAVAILABLE, and the client retries with the same idempotency key, if the fsync does not
  confirm in time); on older Redis we require ``appendfsync always`` (set with CONFIG SET when
  allowed, otherwise the service refuses to start), under which Redis fsyncs before it replies.
  Acknowledged events then survive an OS crash or power loss of the Redis host.
* Neither mode covers losing the Redis disk, or a failover to a replica that had not received
  the write: use replicated storage, or WAITAOF/WAIT on replicas, for that.
* Idempotency: an event is stored at most once per (client, idempotency key) within
  ``idempotency_ttl_seconds``; a retried submission gets the original event id back.

The client's rate limit (token bucket), the join with the completion log
(flywheel.feedback.join_script), the idempotency check, the stream append, the key's record and the
per-kind counter happen in one Lua script per batch — one Redis round trip per SubmitFeedback — so
concurrent submissions of one key, from any number of feedback replicas, store exactly one event.
The script touches keys in different hash slots, so the feedback stream needs a single-shard Redis
(standalone or Sentinel), not Redis Cluster.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis

from flywheel.common import keys
from flywheel.feedback.join import LoggedCompletion, decode_completion
from flywheel.feedback.join_script import ARGS_PER_EVENT, HEADER_ARGS, HEADER_KEYS, JOIN_STORE_SCRIPT

log = logging.getLogger(__name__)

STATS_KEY = keys.PREFIX + "feedback:stats"
"""Hash of accepted-event counts by kind (across all replicas)."""
COMPLETION_PREFIX = keys.completion_key("")

# KEYS: stream, stats, idem keys...   ARGV: ttl, then (hash, kind, record) per event; record "" =
# do not store (unknown completion). Pass 1 checks every key so a conflict stores nothing.
STORE_SCRIPT = """
local ttl = ARGV[1]
local n = #KEYS - 2
local existing, batch_hash = {}, {}
for i = 1, n do
  local key, hash = KEYS[i + 2], ARGV[3 * i - 1]
  if batch_hash[key] == nil then
    local v = redis.call('GET', key)
    if v then
      local sep = string.find(v, ' ', 1, true)
      batch_hash[key] = string.sub(v, 1, sep - 1)
      existing[key] = string.sub(v, sep + 1)
    else
      batch_hash[key] = hash
    end
  end
  if batch_hash[key] ~= hash then
    return {'conflict', tostring(i), existing[key] or ''}
  end
end
local out = {'ok'}
for i = 1, n do
  local key, hash, kind, record = KEYS[i + 2], ARGV[3 * i - 1], ARGV[3 * i], ARGV[3 * i + 1]
  local id = existing[key]
  if id then
    out[#out + 1] = 'duplicate'
    out[#out + 1] = id
  elseif record == '' then
    out[#out + 1] = 'unknown'
    out[#out + 1] = ''
  else
    id = redis.call('XADD', KEYS[1], '*', 'kind', kind, 'record', record)
    redis.call('SET', key, hash .. ' ' .. id, 'EX', ttl)
    redis.call('HINCRBY', KEYS[2], kind, 1)
    existing[key] = id
    out[#out + 1] = 'accepted'
    out[#out + 1] = id
  end
end
return out
"""


class DurabilityError(RuntimeError):
    """Redis cannot give the configured durability; the message says what to change."""


class IdempotencyConflict(Exception):
    """An idempotency key was already used for a different payload."""

    def __init__(self, index: int, existing_event_id: str) -> None:
        super().__init__(index, existing_event_id)
        self.index = index
        self.existing_event_id = existing_event_id


class JoinRejected(Exception):
    """The join shows an event makes no sense: ``reason`` 'prompts' (a comparison of completions
    of different prompts) or 'identical' (a correction equal to the logged completion)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(index, reason)
        self.index = index
        self.reason = reason


class NotDurable(Exception):
    """The append happened but its fsync was not confirmed in time (durability 'always')."""


class RateLimited(Exception):
    """The client's token bucket lacks the batch's tokens: nothing was taken or stored."""

    def __init__(self, wait_ms: int) -> None:
        super().__init__(wait_ms)
        self.wait_ms = wait_ms
        """Milliseconds until the batch's tokens will be available."""


@dataclass(frozen=True)
class RateLimit:
    """A token bucket per API client: ``per_second`` events refill it, it holds at most ``burst``."""

    client: str
    per_second: float
    burst: int


# NamedTuples rather than frozen dataclasses: one of each per event on the ingest path, and a
# tuple is built ~4x faster than a frozen dataclass (whose __init__ goes through object.__setattr__).
class Outcome(NamedTuple):
    status: str  # "accepted" | "duplicate" | "unknown"
    event_id: str
    missing: tuple[str, ...] = ()
    """Status "unknown": the completion ids not in the log (when the store reports them)."""


@dataclass(frozen=True)
class StoreItem:
    """One event to store: its scoped idempotency key, payload hash, kind and record JSON
    ("" when a completion it names is unknown: stored only as a lookup of an earlier event)."""

    key: str
    payload_hash: str
    kind: str
    record_json: str


class JoinItem(NamedTuple):
    """One event to join in Redis and store (see flywheel.feedback.join_script): ``head`` is the
    whole record JSON when ``completion_ids`` is empty, else the record up to the joined fields,
    and ``tail`` the rest."""

    key: str
    payload_hash: str
    kind: str
    head: str
    tail: str
    completion_ids: tuple[str, ...]
    corrected_text: str = ""


@dataclass
class FeedbackStats:
    accepted_by_kind: dict[str, int] = field(default_factory=dict)
    stream_length: int = 0
    consumer_lag: int = 0
    pending: int = 0
    oldest_unconsumed_age_seconds: float = 0.0
    dead_letter_length: int = 0


def _outcomes(reply: list[bytes]) -> list[Outcome]:
    """The join script's {'ok', status, id-or-missing, ...} as outcomes."""
    outcomes = []
    for i in range(1, len(reply), 2):
        status, value = reply[i].decode(), reply[i + 1].decode()
        if status == "unknown":
            outcomes.append(Outcome(status, "", tuple(value.split())))
        else:
            outcomes.append(Outcome(status, value))
    return outcomes


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


def stream_id_seconds(entry_id: str | bytes) -> float:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0]) / 1000.0


class FeedbackStore:
    """The feedback stream and its bookkeeping in one Redis (shared by every replica)."""

    def __init__(
        self,
        client: redis.Redis,
        durability: str = "everysec",
        idempotency_ttl_seconds: int = 48 * 3600,
        fsync_timeout_ms: int = 2000,
        stream: str = keys.FEEDBACK_STREAM,
        group: str = keys.FEEDBACK_GROUP,
        dead_letter: str = keys.FEEDBACK_DEAD_LETTER,
    ) -> None:
        self.redis: Any = client  # redis-py 8 return types are unions; we know the shapes
        self.durability = durability
        self.idempotency_ttl_seconds = idempotency_ttl_seconds
        self.fsync_timeout_ms = fsync_timeout_ms
        self.stream, self.group, self.dead_letter = stream, group, dead_letter
        self.use_waitaof = False
        self._store = client.register_script(STORE_SCRIPT)
        self._join_store = client.register_script(JOIN_STORE_SCRIPT)

    # --- start-up ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Checks that Redis gives the configured durability (see the module docstring); raises
        DurabilityError naming the fix when it cannot."""
        version = str(self.redis.info("server").get("redis_version", "0"))
        config = self._config_get("appendonly", "appendfsync")
        if self.durability == "everysec":
            if config.get("appendonly") == "no":
                log.warning(
                    "Redis has appendonly=no: acknowledged feedback would be lost if Redis restarts; "
                    "enable AOF (appendonly yes) in production"
                )
            return
        if config.get("appendonly") != "yes":
            self._config_set("appendonly", "yes")
        if _version_tuple(version) >= (7, 2):
            self.use_waitaof = True
            log.info("durability=always: WAITAOF after each append (Redis %s)", version)
            return
        if config.get("appendfsync") != "always":
            self._config_set("appendfsync", "always")
        log.info("durability=always: Redis %s has no WAITAOF; appendfsync=always", version)

    def _config_get(self, *names: str) -> dict[str, str]:
        found: dict[str, str] = {}
        for name in names:
            try:
                values = self.redis.config_get(name)
            except redis.ResponseError:
                if self.durability == "always":
                    raise DurabilityError(
                        f"durability=always: cannot read Redis {name} (CONFIG GET is disabled); use Redis "
                        ">= 7.2 with appendonly yes, or set appendfsync always, or set durability: everysec"
                    ) from None
                continue
            for key, value in values.items():
                found[key.decode() if isinstance(key, bytes) else key] = (
                    value.decode() if isinstance(value, bytes) else value
                )
        return found

    def _config_set(self, name: str, value: str) -> None:
        try:
            self.redis.config_set(name, value)
        except redis.ResponseError as exc:
            raise DurabilityError(
                f"durability=always needs Redis {name}={value}, and CONFIG SET {name} was refused ({exc}): "
                f"set '{name} {value}' in redis.conf, use Redis >= 7.2 (WAITAOF), or set durability: everysec"
            ) from exc
        log.warning("durability=always: set Redis %s=%s with CONFIG SET", name, value)

    # --- per batch --------------------------------------------------------------------------
    def lookup_completions(self, completion_ids: set[str]) -> dict[str, LoggedCompletion | None]:
        if not completion_ids:
            return {}
        ordered = sorted(completion_ids)
        pipe = self.redis.pipeline(transaction=False)
        for cid in ordered:
            pipe.hgetall(keys.completion_key(cid))
        return {cid: decode_completion(raw) for cid, raw in zip(ordered, pipe.execute(), strict=True)}

    def store(self, items: list[StoreItem]) -> list[Outcome]:
        """Stores the items atomically (all-or-nothing on conflict); raises IdempotencyConflict
        (index into ``items``) or NotDurable (durability 'always', fsync not confirmed)."""
        args: list[Any] = [self.idempotency_ttl_seconds]
        for item in items:
            args += [item.payload_hash, item.kind, item.record_json]
        reply = self._store(keys=[self.stream, STATS_KEY, *(i.key for i in items)], args=args)
        tag = reply[0].decode()
        if tag == "conflict":
            raise IdempotencyConflict(int(reply[1]) - 1, reply[2].decode())
        outcomes = [Outcome(reply[i].decode(), reply[i + 1].decode()) for i in range(1, len(reply), 2)]
        if self.use_waitaof and any(o.status != "unknown" for o in outcomes):
            self.wait_fsynced()
        return outcomes

    def join_and_store(self, items: list[JoinItem], limit: RateLimit | None = None) -> list[Outcome] | None:
        """Takes ``len(items)`` tokens from ``limit``'s bucket (None: no limit), then joins the
        items with the completion log and stores them, in one atomic script (all or nothing on
        conflict or a rejected join). None when a logged value needs the Python join (the tokens
        were taken, nothing was stored; see flywheel.feedback.join_script). Raises RateLimited,
        JoinRejected, IdempotencyConflict or NotDurable (indices into ``items``)."""
        completion_keys: dict[str, int] = {}
        # KEYS index (1-based) of the first completion key: after the header and idempotency keys
        first_completion = HEADER_KEYS + len(items) + 1
        script_keys = [self.stream, STATS_KEY, keys.rate_limit_key(limit.client if limit else "")]
        args: list[Any] = [
            self.idempotency_ttl_seconds,
            COMPLETION_PREFIX,
            limit.per_second if limit else 0,
            limit.burst if limit else 0,
        ]
        for item in items:
            script_keys.append(item.key)
            slots = [0, 0]
            for j, cid in enumerate(item.completion_ids):
                slots[j] = completion_keys.setdefault(cid, first_completion + len(completion_keys))
            args += (item.payload_hash, item.kind, item.head, item.tail, *slots, item.corrected_text)
        assert len(args) == HEADER_ARGS + ARGS_PER_EVENT * len(items)
        script_keys += [keys.completion_key(cid) for cid in completion_keys]
        reply = self._join_store(keys=script_keys, args=args)
        tag = reply[0]
        if tag == b"ok":
            outcomes = _outcomes(reply)
        elif tag == b"rate_limited":
            raise RateLimited(int(reply[1]))
        elif tag == b"fallback":
            return None
        elif tag == b"invalid":
            raise JoinRejected(int(reply[1]) - 1, reply[2].decode())
        elif tag == b"conflict":
            raise IdempotencyConflict(int(reply[1]) - 1, reply[2].decode())
        else:
            raise AssertionError(f"join script replied {tag!r}")
        if self.use_waitaof and any(o.status != "unknown" for o in outcomes):
            self.wait_fsynced()
        return outcomes

    def wait_fsynced(self) -> None:
        local, _replicas = self.redis.execute_command("WAITAOF", 1, 0, self.fsync_timeout_ms)
        if int(local) < 1:
            raise NotDurable(f"Redis did not confirm the AOF fsync within {self.fsync_timeout_ms} ms")

    # --- stats ------------------------------------------------------------------------------
    def stats(self) -> FeedbackStats:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(STATS_KEY)
        pipe.xlen(self.stream)
        pipe.xlen(self.dead_letter)
        counts, length, dead = pipe.execute()
        stats = FeedbackStats(
            accepted_by_kind={k.decode(): int(v) for k, v in counts.items()},
            stream_length=int(length),
            dead_letter_length=int(dead),
        )
        group = self._group_info()
        if group is None:  # nobody consumes yet: everything is unconsumed
            stats.consumer_lag = stats.stream_length
            first = self.redis.xrange(self.stream, count=1)
            oldest = [first[0][0]] if first else []
        else:
            stats.pending = int(group["pending"])
            last = group["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else str(last)
            stats.consumer_lag = self._lag(group, last)
            oldest = [e[0] for e in self.redis.xrange(self.stream, min=f"({last}", count=1)]
            if stats.pending:
                summary = self.redis.xpending(self.stream, self.group)
                oldest.append(summary["min"])
        if oldest:
            age = time.time() - min(stream_id_seconds(i) for i in oldest)
            stats.oldest_unconsumed_age_seconds = max(0.0, age)
        return stats

    def _group_info(self) -> dict[str, Any] | None:
        try:
            groups = self.redis.xinfo_groups(self.stream)
        except redis.ResponseError:  # no stream yet
            return None
        for group in groups:
            name = group["name"]
            if (name.decode() if isinstance(name, bytes) else name) == self.group:
                return dict(group)
        return None

    def _lag(self, group: dict[str, Any], last_delivered: str, page: int = 10_000) -> int:
        """Entries after the group's last-delivered id. Redis >= 7 reports it; 6.2 is counted."""
        lag = group.get("lag")
        if lag is not None and not (isinstance(lag, float) and math.isnan(lag)):
            return int(lag)
        count, start = 0, f"({last_delivered}"
        while True:
            entries = self.redis.xrange(self.stream, min=start, count=page)
            count += len(entries)
            if len(entries) < page:
                return count
            last_id = entries[-1][0]
            start = "(" + (last_id.decode() if isinstance(last_id, bytes) else last_id)
