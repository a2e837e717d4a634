"""Reward configuration.

Scorer sets are named lists of weighted scorers, e.g. in YAML::

    scorers:
      default:
        - {name: rm, kind: model, weight: 1.0}
        - {name: sentiment, kind: vader, weight: 0.5}
        - {name: brevity, kind: length_penalty, weight: 0.1, params: {target_chars: 200}}
      rules_only:
        - {name: polite, kind: rule, params: {function: "mypkg.rewards:politeness"}}

or as JSON in ``FLYWHEEL_REWARD_SCORERS``. A request's ``scorer`` field picks a set ('' = default).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flywheel.common.config import ConfigError, ServerConfig

DEFAULT_SET = "default"
SCORER_KINDS = ("model", "vader", "length_penalty", "regex", "keyword", "rule")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class ScorerSpec:
    """One scorer inside a set: its component name, kind, weight in the mix and kind-specific params."""

    name: str
    kind: str
    weight: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict)


def parse_scorer_sets(raw: Mapping[str, Any], has_model: bool) -> dict[str, tuple[ScorerSpec, ...]]:
    """Validates the ``scorers`` field's structure; raises ConfigError naming the bad entry."""
    if not raw:
        if not has_model:
            raise ConfigError(
                "model='' (rules only) needs scorers: set e.g. "
                '{"default": [{"name": "sentiment", "kind": "vader"}]}'
            )
        return {DEFAULT_SET: (ScorerSpec("rm", "model"),)}
    if DEFAULT_SET not in raw:
        raise ConfigError(f"scorers has sets {sorted(raw)} but no {DEFAULT_SET!r}: add a 'default' set")
    sets: dict[str, tuple[ScorerSpec, ...]] = {}
    for set_name, entries in raw.items():
        where = f"scorers.{set_name}"
        if not _NAME.match(str(set_name)):
            raise ConfigError(f"{where}: set names are 1-64 characters of letters, digits, '_', '.', '-'")
        if not isinstance(entries, (list, tuple)) or not entries:
            raise ConfigError(f"{where} must be a non-empty list of {{name, kind, weight, params}}")
        specs = [_parse_spec(entry, f"{where}[{i}]", has_model) for i, entry in enumerate(entries)]
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{where}: component names must be unique, {duplicates} repeat")
        sets[str(set_name)] = tuple(specs)
    return sets


def _parse_spec(entry: Any, where: str, has_model: bool) -> ScorerSpec:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a mapping like {{name: rm, kind: model, weight: 1.0}}")
    unknown = set(entry) - {"name", "kind", "weight", "params"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; use name, kind, weight, params")
    name, kind = entry.get("name"), entry.get("kind")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}.name={name!r}: give 1-64 characters of letters, digits, '_', '.', '-'")
    if kind not in SCORER_KINDS:
        raise ConfigError(f"{where}.kind={kind!r}: use one of {', '.join(SCORER_KINDS)}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ConfigError(f"{where}.weight={weight!r}: give a finite number")
    params = entry.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}.params must be a mapping, got {type(params).__name__}")
    if kind == "model" and not has_model:
        raise ConfigError(f"{where} is kind 'model' but model='': set model, or drop this scorer")
    return ScorerSpec(name, kind, float(weight), dict(params))


@dataclass(frozen=True)
class RewardConfig(ServerConfig):
    port: int = 50052
    metrics_port: int = 9102
    model: str = "tiny://reward"
    """Sequence-classification reward model: hub id, local path, tiny://reward, or '' for rule rewards only."""
    device: str = "cpu"
    """'cpu' or 'cuda'."""
    dtype: str = "float32"
    """Reward-model weights dtype: float32, bfloat16 or float16."""
    torch_threads: int = 0
    """CPU threads for model math (process-wide); 0 = torch's default; 1 suits busy shared CPUs."""
    scorers: dict[str, Any] = field(default_factory=dict)
    """Named scorer sets ({set: [{name, kind, weight, params}]}, JSON in env); empty = {default: [rm]}."""
    max_batch_size: int = 32
    """Most samples scored in one model batch."""
    max_wait_ms: float = 5.0
    """How long the batcher waits for more requests before scoring a partial batch."""
    max_queue: int = 4096
    """Queued samples before new requests get RESOURCE_EXHAUSTED."""
    max_samples_per_request: int = 256
    """Most samples in one Score request (INVALID_ARGUMENT beyond)."""
    max_text_chars: int = 16384
    """Longest prompt or completion in characters (INVALID_ARGUMENT beyond)."""
    max_length_tokens: int = 1024
    """Reward-model input is truncated to this many tokens (the start of the prompt goes first)."""
    normalize: bool = False
    """Normalise rewards with the running mean/std (per scorer set) of the raw rewards seen so far."""
    clip: float = 0.0
    """Clip final rewards to [-clip, clip]; 0 turns clipping off."""
    max_push_bytes: int = 8 * 1024**3
    """Largest reward-model push accepted (sum of encoded tensor bytes)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_batch_size < 1 or self.max_queue < 1:
            raise ConfigError("max_batch_size and max_queue must be at least 1")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms={self.max_wait_ms} must be >= 0")
        if self.max_samples_per_request < 1:
            raise ConfigError("max_samples_per_request must be at least 1")
        if self.max_samples_per_request > self.max_queue:
            raise ConfigError(
                f"max_samples_per_request={self.max_samples_per_request} exceeds max_queue={self.max_queue}: "
                "such a request could never be queued; raise max_queue or lower max_samples_per_request"
            )
        if self.max_text_chars < 1 or self.max_length_tokens < 8:
            raise ConfigError("max_text_chars must be >= 1 and max_length_tokens >= 8")
        if not math.isfinite(self.clip) or self.clip < 0:
            raise ConfigError(f"clip={self.clip}: set a finite number >= 0 (0 turns clipping off)")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device={self.device!r}: set 'cpu', 'cuda' or 'cuda:N'")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype={self.dtype!r}: set float32, bfloat16 or float16")
        if self.torch_threads < 0:
            raise ConfigError(f"torch_threads={self.torch_threads}: set 0 (torch default) or a thread count")
        if self.max_push_bytes < 1:
            raise ConfigError("max_push_bytes must be at least 1")
        parse_scorer_sets(self.scorers, bool(self.model))

    def scorer_sets(self) -> dict[str, tuple[ScorerSpec, ...]]:
        """The validated scorer sets, with the implicit {default: [rm]} when none are configured."""
        return parse_scorer_sets(self.scorers, bool(self.model))
