from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel.training.data import (
    DataError,
    best_and_worst_of_n,
    drop_duplicate_responses,
    filter_long,
    load_records,
    split_holdout,
    validate,
)


def test_best_and_worst_of_n_pairs_extremes_and_skips_ties() -> None:
    samples = [
        {"prompt": "p1", "completion": "a", "score": 0.1},
        {"prompt": "p1", "completion": "b", "score": 0.9},
        {"prompt": "p1", "completion": "c", "score": -0.5},
        {"prompt": "p2", "completion": "x", "score": 0.3},
        {"prompt": "p2", "completion": "y", "score": 0.3},  # no margin: no pair
        {"prompt": "p3", "completion": "only", "score": 1.0},  # one sample: no pair
    ]
    pairs = best_and_worst_of_n(samples)
    assert pairs == [{"prompt": "p1", "chosen": "b", "rejected": "c", "margin": pytest.approx(1.4)}]


def test_duplicates_are_dropped_after_whitespace_normalisation() -> None:
    samples = [
        {"prompt": "p", "completion": "the  movie"},
        {"prompt": "p ", "completion": "the movie"},
        {"prompt": "p", "completion": "the film"},
    ]
    assert [s["completion"] for s in drop_duplicate_responses(samples)] == ["the  movie", "the film"]


def test_filter_long_uses_separate_budgets() -> None:
    records = [
        {"prompt": "a b", "completion": "c"},
        {"prompt": "a b c d", "completion": "c"},  # prompt too long
        {"prompt": "a", "chosen": "x y z", "rejected": "x"},  # a response too long
    ]
    kept = filter_long(records, lambda text: len(text.split()), max_prompt_tokens=2, max_response_tokens=2)
    assert kept == [records[0]]


def test_validate_names_record_and_column() -> None:
    with pytest.raises(DataError, match=r"record 1: dpo needs a non-empty string column 'rejected'"):
        validate([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}], "dpo")
    with pytest.raises(DataError, match="no records"):
        validate([], "sft")


def test_load_records_reports_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "d.jsonl"
    good.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n\n")
    assert load_records(good) == [{"prompt": "p", "completion": "c"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_records(bad)
    csv = tmp_path / "x.csv"
    csv.write_text("prompt,completion\n")
    with pytest.raises(DataError, match=r"use \.jsonl or \.parquet"):
        load_records(csv)


def test_split_holdout_is_disjoint_and_deterministic() -> None:
    records = [{"i": i} for i in range(10)]
    train, held = split_holdout(records, 0.2, seed=3)
    assert len(held) == 2 and len(train) == 8
    assert sorted(r["i"] for r in train + held) == list(range(10))
    assert split_holdout(records, 0.2, seed=3) == (train, held)
