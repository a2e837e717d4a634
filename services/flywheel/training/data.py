"""Preference and SFT data: loading (JSONL / Parquet), validation, and reusable preparation steps.

Formats are TRL's: ``prompt``/``completion`` for SFT, ``prompt``/``chosen``/``rejected`` for reward
modelling and DPO — the same columns `flywheel feedback export` writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REQUIRED_COLUMNS = {
    "sft": ("prompt", "completion"),
    "reward": ("prompt", "chosen", "rejected"),
    "dpo": ("prompt", "chosen", "rejected"),
}


class DataError(ValueError):
    """The data file is missing, unreadable or lacks what the stage needs; the message says which."""


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Reads a ``.jsonl`` (one JSON object per line) or ``.parquet`` file into dicts."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data file {str(file)!r} does not exist")
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_table(file).to_pylist())
    if file.suffix not in (".jsonl", ".json"):
        raise DataError(f"data file {str(file)!r}: use .jsonl or .parquet")
    records = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{file}:{number}: expected a JSON object per line")
        records.append(record)
    return records


def validate(records: Sequence[dict[str, Any]], stage: str) -> None:
    """Raises DataError naming the first record and column that do not fit ``stage``."""
    columns = REQUIRED_COLUMNS[stage]
    if not records:
        raise DataError(f"no records: {stage} needs rows with columns {', '.join(columns)}")
    for index, record in enumerate(records):
        for column in columns:
            value = record.get(column)
            if not isinstance(value, str) or not value:
                raise DataError(
                    f"record {index}: {stage} needs a non-empty string column {column!r} "
                    f"(columns needed: {', '.join(columns)}; found: {', '.join(sorted(record)) or 'none'})"
                )


def filter_long(
    records: Iterable[dict[str, Any]],
    count_tokens: Callable[[str], int],
    max_prompt_tokens: int,
    max_response_tokens: int,
    response_columns: Sequence[str] = ("completion", "chosen", "rejected"),
) -> list[dict[str, Any]]:
    """Drops records whose prompt or any response is longer than its token budget."""
    kept = []
    for record in records:
        if count_tokens(record.get("prompt", "")) > max_prompt_tokens:
            continue
        if any(count_tokens(record[c]) > max_response_tokens for c in response_columns if c in record):
            continue
        kept.append(record)
    return kept


def drop_duplicate_responses(samples: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keeps the first of samples with the same (prompt, completion) after whitespace normalisation."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for sample in samples:
        key = (" ".join(sample["prompt"].split()), " ".join(sample["completion"].split()))
        if key not in seen:
            seen.add(key)
            kept.append(sample)
    return kept


def best_and_worst_of_n(samples: Iterable[dict[str, Any]], min_margin: float = 0.0) -> list[dict[str, Any]]:
    """Turns scored samples (``prompt``, ``completion``, ``score``) into one preference pair per prompt:
    the highest-scored completion as chosen, the lowest as rejected. Prompts with a single distinct
    completion, or whose best and worst differ by no more than ``min_margin``, give no pair."""
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for sample in drop_duplicate_responses(samples):
        by_prompt.setdefault(sample["prompt"], []).append(sample)
    pairs = []
    for prompt, group in by_prompt.items():
        if len(group) < 2:
            continue
        ranked = sorted(group, key=lambda s: float(s["score"]))
        worst, best = ranked[0], ranked[-1]
        margin = float(best["score"]) - float(worst["score"])
        if margin > min_margin:
            pairs.append({"prompt": prompt, "chosen": best["completion"], "rejected": worst["completion"],
                          "margin": margin})
    return pairs


def split_holdout(records: Sequence[dict[str, Any]], fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, held_out) with ``fraction`` of the records held out (at least one when fraction > 0)."""
    import random

    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_held = min(len(records) - 1, max(1, round(fraction * len(records)))) if fraction > 0 else 0
    held = [records[i] for i in order[:n_held]]
    train = [records[i] for i in order[n_held:]]
    return train, held
