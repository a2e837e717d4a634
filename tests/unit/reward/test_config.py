from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel.common.config import ConfigError, load_config
from flywheel.reward.config import RewardConfig, ScorerSpec

MIX = {
    "default": [
        {"name": "rm", "kind": "model", "weight": 1.0},
        {"name": "sentiment", "kind": "vader", "weight": 0.5},
        {"name": "brevity", "kind": "length_penalty", "weight": 0.1, "params": {"target_chars": 200}},
    ],
    "rules_only": [{"name": "sentiment", "kind": "vader"}],
}


def test_default_is_the_reward_model_alone() -> None:
    assert RewardConfig().scorer_sets() == {"default": (ScorerSpec("rm", "model"),)}


def test_yaml_and_env_json_express_named_sets(tmp_path: Path) -> None:
    file = tmp_path / "reward.yaml"
    file.write_text(
        "scorers:\n"
        "  default:\n"
        "    - {name: rm, kind: model, weight: 1.0}\n"
        "    - {name: sentiment, kind: vader, weight: 0.5}\n"
        "    - {name: brevity, kind: length_penalty, weight: 0.1, params: {target_chars: 200}}\n"
        "  rules_only:\n"
        "    - {name: sentiment, kind: vader}\n"
    )
    from_yaml = load_config(RewardConfig, "reward", file, environ={})
    from_env = load_config(RewardConfig, "reward", environ={"FLYWHEEL_REWARD_SCORERS": json.dumps(MIX)})
    assert from_yaml.scorer_sets() == from_env.scorer_sets()
    sets = from_env.scorer_sets()
    assert [s.name for s in sets["default"]] == ["rm", "sentiment", "brevity"]
    assert sets["default"][2] == ScorerSpec("brevity", "length_penalty", 0.1, {"target_chars": 200})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"scorers": {"other": [{"name": "s", "kind": "vader"}]}}, "no 'default': add a 'default' set"),
        ({"scorers": {"default": [{"name": "s", "kind": "bogus"}]}}, r"scorers.default\[0\].kind='bogus'"),
        ({"scorers": {"default": []}}, "must be a non-empty list"),
        ({"scorers": {"default": [{"name": "a", "kind": "vader"}] * 2}}, r"unique, \['a'\] repeat"),
        ({"scorers": {"default": [{"name": "a", "kind": "vader", "weight": "x"}]}}, "give a finite number"),
        ({"scorers": {"default": [{"name": "a", "kind": "vader", "wieght": 1}]}}, "unknown keys"),
        ({"model": "", "scorers": {"default": [{"name": "rm", "kind": "model"}]}}, "kind 'model' but model=''"),
        ({"model": ""}, "model='' \\(rules only\\) needs scorers"),
        ({"max_samples_per_request": 10, "max_queue": 5}, "raise max_queue or lower"),
        ({"clip": -1.0}, "clip=-1.0"),
        ({"dtype": "int8"}, "dtype='int8'"),
    ],
)
def test_bad_config_names_the_fix(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RewardConfig(**changes)  # type: ignore[arg-type]
