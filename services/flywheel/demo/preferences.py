"""The simulated users' hidden preference: a function from a completion's text to a score (higher is
better). The demo never shows it to the reward service or the learner; they only see the users'
comparisons and thumbs, so a rising score on fresh prompts means the loop learned it from feedback.

Built-ins suit the tiny demo model, which writes short sentiment sentences ("great and I liked it.").
Anything else is ``package.module:function`` or ``path/to/file.py:function``, called as
``function(text) -> float``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PreferenceFn = Callable[[str], float]
PROBE_TEXT = "great and I liked it."


class PreferenceError(ValueError):
    """The preference cannot be loaded or misbehaves; the message says what to pass instead."""


@cache
def _vader():  # type: ignore[no-untyped-def]
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def positive_sentiment(text: str) -> float:
    """VADER compound sentiment in [-1, 1]: users like cheerful answers."""
    return float(_vader().polarity_scores(text)["compound"])


def negative_sentiment(text: str) -> float:
    """Minus the VADER compound: users like gloomy answers (the opposite of the usual RLHF demo)."""
    return -positive_sentiment(text)


def short_answers(text: str) -> float:
    """Fewer characters is better: -len(text) / 40."""
    return -len(text.strip()) / 40.0


def exclamations(text: str) -> float:
    """Excitement: the number of '!' (at most 3), users want answers that end with a bang."""
    return float(min(text.count("!"), 3))


_FOOD = re.compile(r"\b(food|pizza|dinner|lunch|tasty|delicious|meal)\b", re.IGNORECASE)


def mentions_food(text: str) -> float:
    """1 when the answer talks about food, else 0 (hard for the tiny model: it rarely does)."""
    return 1.0 if _FOOD.search(text) else 0.0


BUILTINS: dict[str, PreferenceFn] = {
    "positive_sentiment": positive_sentiment,
    "negative_sentiment": negative_sentiment,
    "short_answers": short_answers,
    "exclamations": exclamations,
    "mentions_food": mentions_food,
}


@dataclass(frozen=True)
class Preference:
    """A loaded preference: its name (as given) and the checked function."""

    name: str
    fn: PreferenceFn

    def __call__(self, text: str) -> float:
        value = self.fn(text)
        return _check_score(value, self.name, text)


def _check_score(value: object, name: str, text: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # type: ignore[arg-type]  # numpy / torch scalars
        except (TypeError, ValueError):
            raise PreferenceError(
                f"preference {name!r} returned {type(value).__name__} for {text!r}: it must return a number"
            ) from None
    if not math.isfinite(value):
        raise PreferenceError(f"preference {name!r} returned {value} for {text!r}: it must be finite")
    return float(value)


def _import_target(module_part: str, spec: str) -> object:
    if module_part.endswith(".py"):
        path = Path(module_part).expanduser()
        if not path.is_file():
            raise PreferenceError(f"--preference {spec!r}: file {str(path)!r} does not exist")
        file_spec = importlib.util.spec_from_file_location(f"flywheel_demo_preference_{path.stem}", path)
        if file_spec is None or file_spec.loader is None:
            raise PreferenceError(f"--preference {spec!r}: cannot load {str(path)!r} as Python")
        module = importlib.util.module_from_spec(file_spec)
        try:
            file_spec.loader.exec_module(module)
        except Exception as exc:
            raise PreferenceError(f"--preference {spec!r}: {path} raised {type(exc).__name__}: {exc}") from exc
        return module
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as exc:
        raise PreferenceError(
            f"--preference {spec!r}: no module named {exc.name!r} (is it on PYTHONPATH? a file path must end "
            "in .py)"
        ) from exc
    except Exception as exc:
        raise PreferenceError(
            f"--preference {spec!r}: importing {module_part!r} raised {type(exc).__name__}: {exc}"
        ) from exc


def load_preference(spec: str) -> Preference:
    """A built-in name or ``module:function`` / ``file.py:function``; checked on a probe text.

    Raises PreferenceError with what to pass instead.
    """
    spec = spec.strip()
    if spec in BUILTINS:
        return Preference(spec, BUILTINS[spec])
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise PreferenceError(
            f"--preference {spec!r}: give a built-in ({', '.join(BUILTINS)}) or module:function "
            "(e.g. mypkg.prefs:likes_questions, or prefs.py:likes_questions)"
        )
    module = _import_target(module_part, spec)
    fn = getattr(module, attr, None)
    if fn is None:
        raise PreferenceError(f"--preference {spec!r}: {module_part!r} has no attribute {attr!r}")
    if not callable(fn):
        raise PreferenceError(f"--preference {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    preference = Preference(spec, fn)
    try:
        preference(PROBE_TEXT)
    except PreferenceError:
        raise
    except Exception as exc:
        raise PreferenceError(
            f"--preference {spec!r}: calling it as {attr}(text) -> float failed on {PROBE_TEXT!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return preference
