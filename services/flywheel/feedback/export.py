"""Exports joined feedback from the stream as training data in TRL's dataset formats.

  sft         {prompt, completion}          from corrections (SFTTrainer)
  preference  {prompt, chosen, rejected}    from comparisons and corrections (RewardTrainer, DPOTrainer)
  kto         {prompt, completion, label}   from ratings and rated inline pairs (KTOTrainer)

It reads the stream with XRANGE (not through the consumer group), so the learner's position and
pending entries are untouched. ``.jsonl`` or ``.parquet`` by the output file's extension; the
file is written to a temporary name and renamed, so readers never see half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flywheel.common import keys
from flywheel.feedback.records import FeedbackRecord

FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
}
ALIASES = {"dpo": "preference", "reward": "preference", "comparison": "preference", "rating": "kto"}
SUFFIXES = (".jsonl", ".parquet")


class ExportError(ValueError):
    """Bad export arguments; the message says what to pass instead."""


def resolve_kind(kind: str) -> str:
    name = ALIASES.get(kind, kind)
    if name not in FORMATS:
        choices = ", ".join([*FORMATS, *ALIASES])
        raise ExportError(f"--kind {kind!r}: choose one of {choices}")
    return name


def check_output(out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix not in SUFFIXES:
        raise ExportError(f"--out {str(out)!r}: the file name must end in .jsonl or .parquet")
    if not out.parent.exists():
        raise ExportError(f"--out {str(out)!r}: directory {str(out.parent)!r} does not exist")
    return suffix


def iter_records(
    client: Any, stream: str = keys.FEEDBACK_STREAM, page: int = 1000
) -> Iterator[FeedbackRecord]:
    """Every valid record in the stream, oldest first (invalid entries are skipped)."""
    start = "-"
    while True:
        entries = client.xrange(stream, min=start, count=page)
        for raw_id, fields in entries:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            try:
                yield FeedbackRecord.from_json(fields[b"record"], event_id=entry_id)
            except (KeyError, ValueError):
                continue
        if len(entries) < page:
            return
        last = entries[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else last)


def rows(records: Iterator[FeedbackRecord], kind: str) -> Iterator[dict[str, Any]]:
    view = {
        "sft": FeedbackRecord.sft_example,
        "preference": FeedbackRecord.preference_pair,
        "kto": FeedbackRecord.kto_example,
    }[kind]
    for record in records:
        row = view(record)
        if row is not None:
            yield row


def write_rows(data: list[dict[str, Any]], kind: str, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if out.suffix.lower() == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as fh:
                for row in data:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([(c, pa.bool_() if c == "label" else pa.string()) for c in FORMATS[kind]])
            pq.write_table(pa.Table.from_pylist(data, schema=schema), tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def export(client: Any, kind: str, out: Path, stream: str = keys.FEEDBACK_STREAM) -> int:
    """Writes the ``kind`` view of every record to ``out``; returns the number of rows."""
    name = resolve_kind(kind)
    check_output(out)
    data = list(rows(iter_records(client, stream), name))
    write_rows(data, name, out)
    return len(data)
