"""RewardService without gRPC, on rule scorers only (no model to load: fast)."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest

from flywheel.reward.config import RewardConfig
from flywheel.reward.core import InvalidRequest, RewardService, RunningStats
from flywheel.reward.scorers import Sample

RULES = {
    "default": [
        {"name": "sentiment", "kind": "vader", "weight": 0.5},
        {"name": "bang", "kind": "rule", "weight": 2.0,
         "params": {"function": "tests.unit.reward.sample_rules:exclamations"}},
        {"name": "brevity", "kind": "length_penalty", "weight": 0.1, "params": {"target_chars": 10}},
    ],
    "bang_only": [{"name": "bang", "kind": "rule", "params": {"function": "tests.unit.reward.sample_rules:exclamations"}}],
}  # fmt: skip


def service(**changes: Any) -> RewardService:
    config = RewardConfig(model="", scorers=RULES, metrics_port=-1, **changes)
    core = RewardService(config)
    core.load()
    return core


def samples(*completions: str) -> list[Sample]:
    return [Sample(f"id{i}", "prompt", c) for i, c in enumerate(completions)]


def test_mix_is_the_weighted_sum_of_reported_components() -> None:
    result = service().score(samples("great!!", "awful.", "a fine, long and thorough answer"))
    for s in result.scores:
        c = s.components
        assert set(c) == {"sentiment", "bang", "brevity"}
        assert s.raw_reward == pytest.approx(0.5 * c["sentiment"] + 2.0 * c["bang"] + 0.1 * c["brevity"])
        assert s.reward == s.raw_reward  # normalisation off
    assert [s.sample_id for s in result.scores] == ["id0", "id1", "id2"]
    assert result.scores[0].components["bang"] == 2.0
    assert result.normalization.enabled is False and (result.normalization.mean, result.normalization.std) == (0, 1)


def test_welford_matches_the_textbook() -> None:
    values = [3.0, -1.5, 2.25, 8.0, 0.0, 0.5]
    stats = RunningStats()
    stats.update(values[:2])
    stats.update(values[2:])
    assert stats.count == 6
    assert stats.mean == pytest.approx(statistics.fmean(values))
    assert stats.std == pytest.approx(statistics.pstdev(values))


def test_normalisation_and_clipping_are_reported_and_applied() -> None:
    core = service(normalize=True, clip=1.0)
    first = core.score(samples("!"), "bang_only")
    assert first.normalization.count == 1 and first.normalization.std == 1.0  # no spread yet: centre only
    assert first.scores[0].reward == 0.0
    result = core.score(samples("", "!!", "!!!!!!!!!!"), "bang_only")
    n = result.normalization
    raws = [1.0, 0.0, 2.0, 10.0]
    assert (n.enabled, n.count, n.clip) == (True, 4, 1.0)
    assert n.mean == pytest.approx(statistics.fmean(raws)) and n.std == pytest.approx(statistics.pstdev(raws))
    for s in result.scores:
        assert s.reward == pytest.approx(max(-1.0, min(1.0, (s.raw_reward - n.mean) / n.std)))
    assert result.scores[2].reward == 1.0  # clipped
    # Sets keep their own statistics: rewards on different scales never share a mean.
    assert core.score(samples("ok"), "default").normalization.count == 1


@pytest.mark.parametrize(
    ("batch", "scorer", "message"),
    [
        ([], "", "samples is empty"),
        ([Sample("a", "p", "c")] * 5, "", r"samples has 5 entries; the limit is 4 \(max_samples_per_request\)"),
        ([Sample("a", "p", "c"), Sample("b", "p", "x" * 101)], "", r"samples\[1\].completion has 101 characters; the limit is 100"),
        ([Sample("a", "p" * 101, "c")], "", r"samples\[0\].prompt has 101 characters"),
        ([Sample("a" * 300, "p", "c")], "", r"samples\[0\].sample_id has 300 characters; the limit is 256"),
        ([Sample("a", "p", "c")], "nope", "scorer 'nope' is not configured here; configured sets: default, bang_only"),
    ],
)  # fmt: skip
def test_bad_requests_name_field_index_and_limit(batch: list[Sample], scorer: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        service(max_samples_per_request=4, max_text_chars=100).score(batch, scorer)


def test_rules_only_service_has_version_zero_and_describes_its_sets() -> None:
    core = service()
    assert core.score(samples("hi")).model_version == 0
    info = core.describe()
    kinds = {s.name: (s.kind, s.weight) for s in info.scorers}
    assert kinds["default"] == ("mix", 1.0) and kinds["default.bang"] == ("rule", 2.0)
    assert math.isclose(kinds["default.brevity"][1], 0.1)
