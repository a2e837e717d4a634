"""Rule scorers: built-ins users expect, plus any ``module:function`` as a reward.

A scorer maps a batch of samples to one float each. Built-ins: ``vader`` (lexicon sentiment of
the completion, the VADER compound score in [-1, 1]), ``length_penalty``, ``regex`` and
``keyword``. ``rule`` imports ``params.function`` ("package.module:function"), called as
``function(prompt, completion, **other_params) -> float``, or with ``batched: true`` as
``function(prompts, completions, **other_params) -> list[float]``. The reward model itself
(kind ``model``) lives in ``model_scorer.py``: it is batched across requests, rules are not.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from flywheel.common.config import ConfigError
from flywheel.reward.config import ScorerSpec


@dataclass(frozen=True)
class Sample:
    """One (prompt, completion) pair to score."""

    sample_id: str
    prompt: str
    completion: str


class ScorerError(RuntimeError):
    """A scorer failed or returned something that is not a finite number (a deployment bug)."""


class Scorer(Protocol):
    """Scores a batch of samples: one float per sample, in order."""

    name: str
    kind: str  # "model" or "rule", as GetModel reports it
    source: str  # where it comes from: model id, "builtin:vader", "pkg.mod:fn"

    def __call__(self, samples: Sequence[Sample]) -> list[float]: ...


@dataclass(frozen=True)
class RuleScorer:
    """A scorer computed per request in the caller's thread (cheap, no model). ``blocking``: user
    code (``module:function``) that may take long or block, so an asyncio server runs it in a
    worker thread rather than on its event loop; the built-ins are ours and cheap."""

    name: str
    source: str
    fn: Callable[[Sequence[Sample]], list[float]]
    kind: str = "rule"
    blocking: bool = False

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        try:
            values = list(self.fn(samples))
        except Exception as exc:
            raise ScorerError(f"scorer {self.name!r} ({self.source}) raised {type(exc).__name__}: {exc}") from exc
        if len(values) != len(samples):
            raise ScorerError(
                f"scorer {self.name!r} ({self.source}) returned {len(values)} values for {len(samples)} samples"
            )
        return [_finite(v, self.name, self.source, i) for i, v in enumerate(values)]


def _finite(value: Any, name: str, source: str, index: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy / torch scalars
        except (TypeError, ValueError):
            raise ScorerError(
                f"scorer {name!r} ({source}) returned {type(value).__name__} for sample {index}, not a number"
            ) from None
    if not math.isfinite(value):
        raise ScorerError(f"scorer {name!r} ({source}) returned {value} for sample {index}")
    return float(value)


# --- parameters -------------------------------------------------------------------------------
class _Params:
    """Reads a scorer's params with errors that name the scorer, the key and what to set."""

    def __init__(self, spec: ScorerSpec, allowed: Sequence[str]) -> None:
        self.spec = spec
        unknown = sorted(set(spec.params) - set(allowed))
        if unknown:
            raise ConfigError(
                f"scorer {spec.name!r} (kind {spec.kind}): unknown params {unknown}; "
                f"allowed: {', '.join(allowed) or 'none'}"
            )

    def _fail(self, key: str, want: str) -> ConfigError:
        value = self.spec.params.get(key)
        return ConfigError(f"scorer {self.spec.name!r} (kind {self.spec.kind}): params.{key}={value!r}: {want}")

    def text(self, key: str, default: str | None = None, choices: Sequence[str] = ()) -> str:
        value = self.spec.params.get(key, default)
        if not isinstance(value, str) or (choices and value not in choices):
            raise self._fail(key, f"set one of {', '.join(choices)}" if choices else "set a string")
        return value

    def number(self, key: str, default: float, positive: bool = False) -> float:
        value = self.spec.params.get(key, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (positive and value <= 0):
            raise self._fail(key, "set a positive number" if positive else "set a finite number")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.spec.params.get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, "set true or false")
        return value


FIELDS = ("completion", "prompt", "both")


def _field(sample: Sample, which: str) -> str:
    if which == "prompt":
        return sample.prompt
    if which == "both":
        return f"{sample.prompt}\n{sample.completion}"
    return sample.completion


# --- built-ins --------------------------------------------------------------------------------
def _vader(spec: ScorerSpec) -> RuleScorer:
    p = _Params(spec, ["field"])
    which = p.text("field", "completion", FIELDS)
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()  # loads the lexicon once; scoring only reads it

    def score(samples: Sequence[Sample]) -> list[float]:
        return [analyzer.polarity_scores(_field(s, which))["compound"] for s in samples]

    return RuleScorer(spec.name, "builtin:vader", score)


def _length_penalty(spec: ScorerSpec) -> RuleScorer:
    """0 at or under target_chars ('over' mode) or at it ('abs' mode), -1 per target_chars off."""
    p = _Params(spec, ["target_chars", "mode"])
    target = p.number("target_chars", 200, positive=True)
    mode = p.text("mode", "over", ("over", "abs"))

    def score(samples: Sequence[Sample]) -> list[float]:
        off = [len(s.completion) - target for s in samples]
        return [-(max(d, 0.0) if mode == "over" else abs(d)) / target for d in off]

    return RuleScorer(spec.name, f"builtin:length_penalty(target_chars={target:g},mode={mode})", score)


def _regex(spec: ScorerSpec) -> RuleScorer:
    p = _Params(spec, ["pattern", "field", "ignore_case", "match", "no_match"])
    pattern = p.text("pattern")
    which = p.text("field", "completion", FIELDS)
    hit, miss = p.number("match", 1.0), p.number("no_match", 0.0)
    try:
        regex = re.compile(pattern, re.IGNORECASE if p.flag("ignore_case", False) else 0)
    except re.error as exc:
        raise ConfigError(f"scorer {spec.name!r} (kind regex): params.pattern={pattern!r} is invalid: {exc}") from exc

    def score(samples: Sequence[Sample]) -> list[float]:
        return [hit if regex.search(_field(s, which)) else miss for s in samples]

    return RuleScorer(spec.name, f"builtin:regex({pattern})", score)


def _keyword(spec: ScorerSpec) -> RuleScorer:
    """'fraction' (default): share of keywords present; 'any': 1 if any is present, else 0."""
    p = _Params(spec, ["keywords", "field", "ignore_case", "mode"])
    keywords = spec.params.get("keywords")
    if not isinstance(keywords, (list, tuple)) or not keywords or not all(isinstance(k, str) and k for k in keywords):
        raise p._fail("keywords", "set a non-empty list of non-empty strings")
    which = p.text("field", "completion", FIELDS)
    fold = p.flag("ignore_case", True)
    mode = p.text("mode", "fraction", ("fraction", "any"))
    words = [k.lower() if fold else k for k in keywords]

    def score(samples: Sequence[Sample]) -> list[float]:
        values = []
        for s in samples:
            text = _field(s, which).lower() if fold else _field(s, which)
            found = sum(w in text for w in words)
            values.append(float(found > 0) if mode == "any" else found / len(words))
        return values

    return RuleScorer(spec.name, f"builtin:keyword({','.join(keywords)})", score)


def import_function(path: str, where: str) -> Callable[..., Any]:
    """Imports ``package.module:function``; raises ConfigError that says what went wrong."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{where}={path!r}: write it as 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module failed while importing
        raise ConfigError(f"{where}={path!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}={path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}={path!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj  # type: ignore[no-any-return]


def _rule(spec: ScorerSpec) -> RuleScorer:
    if "function" not in spec.params:
        raise ConfigError(
            f"scorer {spec.name!r} (kind rule): set params.function to 'package.module:function'"
        )
    path = _Params(spec, list(spec.params)).text("function")
    fn = import_function(path, f"scorer {spec.name!r} params.function")
    batched = spec.params.get("batched", False)
    if not isinstance(batched, bool):
        raise ConfigError(f"scorer {spec.name!r}: params.batched={batched!r}: set true or false")
    kwargs = {k: v for k, v in spec.params.items() if k not in ("function", "batched")}

    def score(samples: Sequence[Sample]) -> list[float]:
        if batched:
            return list(fn([s.prompt for s in samples], [s.completion for s in samples], **kwargs))
        return [fn(s.prompt, s.completion, **kwargs) for s in samples]

    return RuleScorer(spec.name, path, score, blocking=True)


BUILDERS: Mapping[str, Callable[[ScorerSpec], RuleScorer]] = {
    "vader": _vader,
    "length_penalty": _length_penalty,
    "regex": _regex,
    "keyword": _keyword,
    "rule": _rule,
}


def build_rule_scorer(spec: ScorerSpec) -> RuleScorer:
    """Builds the rule scorer for ``spec`` (any kind but 'model'); raises ConfigError on bad params."""
    if spec.kind not in BUILDERS:
        raise ConfigError(f"scorer {spec.name!r}: kind {spec.kind!r} is not a rule; use {', '.join(BUILDERS)}")
    return BUILDERS[spec.kind](spec)
