"""Reading the feedback stream through a consumer group (at-least-once), for the learner.

    consumer = FeedbackConsumer(redis.Redis.from_url(url), group="learner", consumer_name="learner-0")
    while True:
        records = consumer.reclaim() + consumer.read(count=256, block_ms=1000)
        train_on(records)
        consumer.ack([r.event_id for r in records])

Delivery: ``read`` returns entries never delivered to the group; entries a consumer read but
did not ack (it crashed) stay pending, and after ``min_idle_ms`` any consumer's ``reclaim`` takes
them over (XAUTOCLAIM). An entry delivered more than ``max_deliveries`` times, or one that is not
a valid record, is a poison event: it is copied to the dead-letter stream (with its source id,
delivery count and reason) and acked, in one MULTI/EXEC, so it stops blocking the group.
The group's position lives in Redis, so a restarted learner resumes where it acked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis

from flywheel.common import keys
from flywheel.feedback.records import FeedbackRecord

log = logging.getLogger(__name__)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class PendingSummary:
    count: int
    min_id: str
    max_id: str
    consumers: dict[str, int]


class FeedbackConsumer:
    """One consumer of the feedback stream in consumer group ``group``."""

    def __init__(
        self,
        client: redis.Redis,
        group: str = keys.FEEDBACK_GROUP,
        consumer_name: str = "learner-0",
        stream: str = keys.FEEDBACK_STREAM,
        dead_letter: str = keys.FEEDBACK_DEAD_LETTER,
        max_deliveries: int = 5,
        min_idle_ms: int = 60_000,
        start_id: str = "0",
    ) -> None:
        """``start_id``: where a newly created group starts ("0" = the whole stream, "$" = only new
        events). ``max_deliveries``: deliveries after which an entry is dead-lettered.
        ``min_idle_ms``: how long an entry must sit unacked before ``reclaim`` takes it over."""
        if max_deliveries < 1 or min_idle_ms < 0:
            raise ValueError("max_deliveries must be >= 1 and min_idle_ms >= 0")
        self.redis: Any = client  # redis-py 8 return types are unions; we know the shapes
        self.group, self.consumer_name = group, consumer_name
        self.stream, self.dead_letter_stream = stream, dead_letter
        self.max_deliveries, self.min_idle_ms = max_deliveries, min_idle_ms
        self.ensure_group(start_id)

    def ensure_group(self, start_id: str = "0") -> None:
        """Creates the group (and the stream) when missing; an existing group keeps its position."""
        try:
            self.redis.xgroup_create(self.stream, self.group, id=start_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # --- reading ----------------------------------------------------------------------------
    def read(self, count: int = 100, block_ms: int | None = None) -> list[FeedbackRecord]:
        """Up to ``count`` never-delivered records; waits up to ``block_ms`` for the first one
        (None = do not wait). Invalid entries are dead-lettered, not returned."""
        reply = self.redis.xreadgroup(
            self.group, self.consumer_name, {self.stream: ">"}, count=count, block=block_ms
        )
        entries = reply[0][1] if reply else []
        return self._parse(entries, deliveries=1)

    def reclaim(self, count: int = 100) -> list[FeedbackRecord]:
        """Takes over entries pending (unacked) for at least ``min_idle_ms`` in any consumer and
        returns them, dead-lettering those delivered more than ``max_deliveries`` times."""
        reply = self.redis.xautoclaim(
            self.stream, self.group, self.consumer_name, self.min_idle_ms, start_id="0-0", count=count
        )
        entries = [e for e in reply[1] if e is not None and e[1] is not None]
        if not entries:
            return []
        ids = [_text(e[0]) for e in entries]
        pending = self.redis.xpending_range(
            self.stream, self.group, min=ids[0], max=ids[-1], count=len(ids) + 100,
            consumername=self.consumer_name,
        )  # fmt: skip
        deliveries = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        keep = []
        for entry_id, entry in zip(ids, entries, strict=True):
            times = deliveries.get(entry_id, 1)
            if times > self.max_deliveries:
                self.dead_letter(entry_id, f"delivered {times} times without an ack", entry[1], times)
            else:
                keep.append(entry)
        return self._parse(keep, deliveries=0)

    def _parse(self, entries: list[Any], deliveries: int) -> list[FeedbackRecord]:
        records = []
        for raw_id, fields in entries:
            entry_id = _text(raw_id)
            try:
                records.append(FeedbackRecord.from_json(fields[b"record"], event_id=entry_id))
            except (KeyError, ValueError) as exc:
                self.dead_letter(entry_id, f"not a feedback record: {exc}", fields, deliveries)
        return records

    # --- acknowledging ----------------------------------------------------------------------
    def ack(self, ids: list[str]) -> int:
        """Marks records processed; returns how many were pending."""
        return int(self.redis.xack(self.stream, self.group, *ids)) if ids else 0

    def dead_letter(
        self, entry_id: str, reason: str, fields: dict[Any, Any] | None = None, deliveries: int = 0
    ) -> None:
        """Copies one entry to the dead-letter stream and acks it (atomically). The learner may call
        it for a record it cannot process (``fields`` are then read from the stream)."""
        if fields is None:
            found = self.redis.xrange(self.stream, min=entry_id, max=entry_id)
            fields = found[0][1] if found else {}
        body = {k: v for k, v in fields.items() if _text(k) not in ("source_id", "reason", "deliveries")}
        body.update({"source_id": entry_id, "reason": reason, "deliveries": str(deliveries)})
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.dead_letter_stream, body)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()
        log.warning("feedback entry %s dead-lettered: %s", entry_id, reason)

    def pending(self) -> PendingSummary:
        summary = self.redis.xpending(self.stream, self.group)
        consumers = {_text(c["name"]): int(c["pending"]) for c in summary.get("consumers") or []}
        return PendingSummary(
            int(summary["pending"]),
            _text(summary["min"] or ""),
            _text(summary["max"] or ""),
            consumers,
        )
