"""`flywheel feedback export` writes TRL dataset formats (JSONL and Parquet) from a real stream."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
import pytest
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.feedback.config import FeedbackConfig
from flywheel.feedback.consumer import FeedbackConsumer
from flywheel.feedback.server import build_server
from flywheel.v1 import feedback_pb2 as pb
from flywheel.v1 import feedback_pb2_grpc
from tests.conftest import auth
from tests.unit.feedback.completion_log import log_completion


@pytest.fixture
def filled(start_server: Any, server_config: dict[str, Any], redis_client: Any, api_key: str) -> Any:
    server = start_server(build_server, FeedbackConfig(**server_config))
    a = log_completion(redis_client, "Q", "answer A")
    b = log_completion(redis_client, "Q", "answer B")
    events = [
        pb.FeedbackEvent(idempotency_key="1", rating=pb.Rating(completion_id=a, thumb=pb.THUMB_DOWN)),
        pb.FeedbackEvent(
            idempotency_key="2",
            comparison=pb.Comparison(
                by_id=pb.CompletionIdPair(chosen_completion_id=b, rejected_completion_id=a)
            ),
        ),
        pb.FeedbackEvent(
            idempotency_key="3", correction=pb.Correction(completion_id=a, corrected_text="better")
        ),
        pb.FeedbackEvent(
            idempotency_key="4",
            inline_pair=pb.InlinePair(
                prompt="P", completion="C", scalar=pb.ScalarScore(value=5, min=1, max=5)
            ),
        ),
        pb.FeedbackEvent(idempotency_key="5", inline_pair=pb.InlinePair(prompt="P", completion="unrated")),
    ]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        stub.SubmitFeedback(pb.SubmitFeedbackRequest(events=events), metadata=auth(api_key), timeout=10)
    return redis_client


def run(*args: str) -> Any:
    return CliRunner().invoke(app, ["feedback", "export", *args])


def test_export_trl_formats(filled: Any, redis_url: str, tmp_path: Path) -> None:
    consumer = FeedbackConsumer(filled, consumer_name="learner-0")
    consumer.read(count=2)  # the learner is mid-way; export must not move it
    before = consumer.pending()
    result = run("--kind", "preference", "--out", str(tmp_path / "pairs.parquet"), "--redis-url", redis_url)
    assert result.exit_code == 0, result.output
    pairs = pd.read_parquet(tmp_path / "pairs.parquet")
    assert list(pairs.columns) == ["prompt", "chosen", "rejected"]
    assert pairs.to_dict("records") == [
        {"prompt": "Q", "chosen": "answer B", "rejected": "answer A"},
        {"prompt": "Q", "chosen": "better", "rejected": "answer A"},
    ]
    assert run("--kind", "sft", "--out", str(tmp_path / "sft.jsonl"), "--redis-url", redis_url).exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": "Q", "completion": "better"}]
    assert run("--kind", "kto", "--out", str(tmp_path / "kto.jsonl"), "--redis-url", redis_url).exit_code == 0
    kto = pd.read_json(tmp_path / "kto.jsonl", lines=True)
    assert kto.to_dict("records") == [
        {"prompt": "Q", "completion": "answer A", "label": False},
        {"prompt": "P", "completion": "C", "label": True},
    ]
    assert consumer.pending() == before
    assert FeedbackConsumer(filled, consumer_name="x").read(count=10)[0].idempotency_key == "3"


def test_export_reads_redis_url_from_env(
    filled: Any, redis_url: str, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("FLYWHEEL_REDIS_URL", redis_url)
    assert run("--kind", "dpo", "--out", str(tmp_path / "p.jsonl")).exit_code == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kind", "nonsense", "--out", "x.jsonl"], "choose one of"),
        (["--kind", "sft", "--out", "x.csv"], ".jsonl or .parquet"),
        (["--kind", "sft", "--out", "/no/such/dir/x.jsonl"], "does not exist"),
        (["--out", "x.jsonl"], "--kind"),
    ],
)
def test_export_bad_arguments_exit_2(args: list[str], message: str, redis_url: str) -> None:
    result = run(*args, "--redis-url", redis_url)
    assert result.exit_code == 2
    assert message in result.output
