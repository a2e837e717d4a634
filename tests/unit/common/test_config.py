from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.common.config import ConfigError, field_docs, load_config
from flywheel.generator.config import GeneratorConfig
from flywheel.learner.config import LearnerConfig


def test_precedence_defaults_yaml_env_flags(tmp_path: Path) -> None:
    file = tmp_path / "g.yaml"
    file.write_text("port: 6000\nmax_batch_size: 4\nmodel: from-yaml\n")
    env = {"FLYWHEEL_PORT": "6001", "FLYWHEEL_GENERATOR_PORT": "6002", "FLYWHEEL_MAX_BATCH_SIZE": "8"}
    cfg = load_config(GeneratorConfig, "generator", file, environ=env, overrides={"host": "0.0.0.0"})
    assert cfg.port == 6002  # service-specific env beats shared env beats YAML
    assert cfg.max_batch_size == 8  # shared env beats YAML
    assert cfg.model == "from-yaml"  # YAML beats default
    assert cfg.host == "0.0.0.0"  # flags beat everything
    assert cfg.engine == "transformers"  # default


def test_defaults_alone() -> None:
    cfg = load_config(GeneratorConfig, "generator", environ={})
    assert (cfg.port, cfg.metrics_port) == (50051, 9101)


def test_unknown_yaml_key_suggests_the_right_one(tmp_path: Path) -> None:
    file = tmp_path / "g.yaml"
    file.write_text("max_batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'max_batch_sise'.*did you mean 'max_batch_size'"):
        load_config(GeneratorConfig, "generator", file, environ={})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FLYWHEEL_GENERATOR_PORT": "abc"}, r"port='abc' from \$FLYWHEEL_GENERATOR_PORT is not a valid int"),
        ({"FLYWHEEL_GENERATOR_ENGINE": "tgi"}, r"engine='tgi': set 'vllm' \(GPU\) or 'transformers'"),
        ({"FLYWHEEL_AUTH_DISABLED": "maybe"}, r"auth_disabled='maybe'.*expected true or false"),
        ({"FLYWHEEL_PORT": "70000"}, r"port=70000 is out of range"),
        ({"FLYWHEEL_API_KEYS_FILE": "/nonexistent/keys"}, r"api_keys_file='/nonexistent/keys' does not exist"),
    ],
)
def test_bad_values_name_the_fix(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(GeneratorConfig, "generator", environ=env)


def test_tuple_fields_from_env_and_yaml(tmp_path: Path) -> None:
    cfg = load_config(LearnerConfig, "learner", environ={"FLYWHEEL_LEARNER_GENERATOR_TARGETS": "a:1, b:2"})
    assert cfg.generator_targets == ("a:1", "b:2")
    file = tmp_path / "l.yaml"
    file.write_text("generator_targets: [x:1]\n")
    assert load_config(LearnerConfig, "learner", file, environ={}).generator_targets == ("x:1",)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(GeneratorConfig, "generator", tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(GeneratorConfig, "generator", bad, environ={})


def test_config_is_frozen_and_documented() -> None:
    cfg = load_config(GeneratorConfig, "generator", environ={})
    with pytest.raises(AttributeError):
        cfg.port = 1  # type: ignore[misc]
    docs = field_docs(GeneratorConfig)
    assert "gRPC port" in docs["port"] and "batcher" in docs["max_wait_ms"]
