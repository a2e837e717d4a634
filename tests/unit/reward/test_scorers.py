from __future__ import annotations

import pytest

from flywheel.common.config import ConfigError
from flywheel.reward.config import ScorerSpec
from flywheel.reward.scorers import Sample, ScorerError, build_rule_scorer

SAMPLES = [
    Sample("a", "how was the film?", "It was wonderful, I loved it!"),
    Sample("b", "and the food?", "terrible, awful food"),
    Sample("c", "x", ""),
]


def score(kind: str, params: dict[str, object] | None = None) -> list[float]:
    return build_rule_scorer(ScorerSpec("s", kind, 1.0, params or {}))(SAMPLES)


def test_vader_is_a_real_lexicon_sentiment() -> None:
    positive, negative, empty = score("vader")
    assert positive > 0.5 and negative < -0.5 and empty == 0.0


def test_length_penalty() -> None:
    assert score("length_penalty", {"target_chars": 10}) == [-(29 - 10) / 10, -(20 - 10) / 10, 0.0]
    assert score("length_penalty", {"target_chars": 10, "mode": "abs"})[2] == -1.0


def test_regex_and_keyword() -> None:
    assert score("regex", {"pattern": r"^it was", "ignore_case": True}) == [1.0, 0.0, 0.0]
    assert score("regex", {"pattern": "film", "field": "prompt", "match": 2, "no_match": -1}) == [2.0, -1.0, -1.0]
    assert score("keyword", {"keywords": ["loved", "awful", "food"]}) == [1 / 3, 2 / 3, 0.0]
    assert score("keyword", {"keywords": ["LOVED"], "mode": "any"}) == [1.0, 0.0, 0.0]


def test_module_function_rules() -> None:
    assert score("rule", {"function": "tests.unit.reward.sample_rules:exclamations", "per_mark": 2.0}) == [
        2.0,
        0.0,
        0.0,
    ]
    batched = {"function": "tests.unit.reward.sample_rules:prompt_overlap", "batched": True}
    assert score("rule", batched) == [1.0, 0.0, 0.0]  # "was" is in prompt and completion


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("rule", {}, "set params.function to 'package.module:function'"),
        ("rule", {"function": "no_colon"}, "write it as 'package.module:function'"),
        ("rule", {"function": "tests.unit.reward.nowhere:f"}, "cannot import 'tests.unit.reward.nowhere'"),
        ("rule", {"function": "tests.unit.reward.sample_rules:missing"}, "has no attribute 'missing'"),
        ("rule", {"function": "tests.unit.reward.sample_rules:NOT_CALLABLE"}, "is a int, not a function"),
        ("regex", {"pattern": "("}, "is invalid"),
        ("regex", {}, "params.pattern=None"),
        ("keyword", {"keywords": []}, "non-empty list"),
        ("length_penalty", {"target_chars": 0}, "set a positive number"),
        ("vader", {"field": "title"}, "set one of completion, prompt, both"),
        ("vader", {"lexicon": "x"}, r"unknown params \['lexicon'\]"),
    ],
)
def test_bad_scorer_params_are_config_errors(kind: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_rule_scorer(ScorerSpec("s", kind, 1.0, params))


def test_a_rule_returning_nan_is_a_scorer_error() -> None:
    with pytest.raises(ScorerError, match=r"'s' \(tests.unit.reward.sample_rules:not_a_number\) returned nan"):
        score("rule", {"function": "tests.unit.reward.sample_rules:not_a_number"})
