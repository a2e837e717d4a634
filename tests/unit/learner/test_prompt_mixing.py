"""The PPO prompt pool on a real Redis: production prompts from the generator's prompt stream mixed with
the configured dataset at ``prompt_stream_fraction``, the shortfall topped up from the file, and the
position in both sources resumed exactly from a checkpointed state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flywheel.common import keys
from flywheel.learner.prompts import NoPrompts, PromptSource


@pytest.fixture
def dataset(tmp_path: Path) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"d{i}", "prompt": f"dataset {i}"}) for i in range(6)) + "\n")
    return str(path)


def produce(redis_client: Any, n: int, start: int = 0) -> None:
    """Production prompts as the generator's completion log writes them."""
    for i in range(start, start + n):
        redis_client.xadd(keys.PROMPTS_STREAM, {"prompt": f"user {i}", "prompt_messages": "",
                                                "completion_id": f"c{i}", "policy_version": "0"})


def sources(batch: list[Any]) -> list[str]:
    return ["stream" if p.prompt_id.startswith("stream-") else "file" for p in batch]


def test_each_batch_takes_the_configured_share_from_the_stream(redis_client: Any, dataset: str) -> None:
    produce(redis_client, 20)
    source = PromptSource(dataset, True, redis_client, seed=0, stream_fraction=0.5)
    batch = source.next_batch(4)
    assert sources(batch) == ["stream", "stream", "file", "file"]
    assert [p.text for p in batch[:2]] == ["user 0", "user 1"]  # oldest unread production prompts first
    assert [p.text for p in source.next_batch(4)[:2]] == ["user 2", "user 3"]


def test_a_fraction_that_does_not_divide_the_batch_is_exact_over_the_run(redis_client: Any, dataset: str) -> None:
    produce(redis_client, 40)
    source = PromptSource(dataset, True, redis_client, seed=0, stream_fraction=0.3)
    per_batch = [sources(source.next_batch(4)).count("stream") for _ in range(10)]
    assert per_batch == [1, 1, 2, 1, 1, 1, 1, 2, 1, 1] and sum(per_batch) == 12  # round(0.3 * 40)
    assert [PromptSource(dataset, True, redis_client, 0, f).stream_quota(4) for f in (0.0, 1.0)] == [0, 4]


def test_the_file_tops_up_when_the_stream_runs_short_and_without_a_file_the_learner_waits(
    redis_client: Any, dataset: str
) -> None:
    produce(redis_client, 1)
    source = PromptSource(dataset, True, redis_client, seed=0, stream_fraction=0.75)
    assert sources(source.next_batch(4)) == ["stream", "file", "file", "file"]
    stream_only = PromptSource("", True, redis_client, seed=0, stream_fraction=0.5)
    with pytest.raises(NoPrompts):
        stream_only.next_batch(4)  # one new entry of four: wait rather than train on a partial batch
    produce(redis_client, 3, start=1)
    assert [p.text for p in stream_only.next_batch(4)] == ["user 0", "user 1", "user 2", "user 3"]


def test_without_the_stream_everything_comes_from_the_dataset(redis_client: Any, dataset: str) -> None:
    produce(redis_client, 8)
    source = PromptSource(dataset, False, redis_client, seed=0, stream_fraction=0.5)
    assert sources(source.next_batch(4)) == ["file"] * 4


def test_both_positions_resume_exactly_from_the_checkpointed_state(redis_client: Any, dataset: str) -> None:
    produce(redis_client, 30)
    original = PromptSource(dataset, True, redis_client, seed=3, stream_fraction=0.3)
    for _ in range(3):
        original.next_batch(4)
    state = json.loads(json.dumps(original.state_dict()))  # as a checkpoint stores it
    resumed = PromptSource(dataset, True, redis_client, seed=3, stream_fraction=0.3)
    resumed.load_state_dict(state)
    for _ in range(5):  # crosses a dataset epoch (6 prompts) and keeps the stream quota's rounding
        assert [p.prompt_id for p in resumed.next_batch(4)] == [p.prompt_id for p in original.next_batch(4)]
    legacy = PromptSource(dataset, True, redis_client, seed=3, stream_fraction=0.3)
    legacy.load_state_dict({k: v for k, v in state.items() if k != "drawn"})  # checkpoint from before mixing
    assert legacy.drawn == 0 and legacy.stream_id == state["stream_id"]
