"""Rule rewards for the tests, imported through 'module:function' like a user's own."""

from __future__ import annotations

import threading


def exclamations(prompt: str, completion: str, per_mark: float = 1.0) -> float:
    return per_mark * completion.count("!")


def prompt_overlap(prompts: list[str], completions: list[str]) -> list[float]:
    return [float(len(set(p.split()) & set(c.split()))) for p, c in zip(prompts, completions, strict=True)]


def not_a_number(prompt: str, completion: str) -> float:
    return float("nan")


NOT_CALLABLE = 3


# A user rule that blocks (a network call, a slow judge): held until the test releases it.
GATE = threading.Event()
ENTERED = threading.Event()


def gated(prompt: str, completion: str) -> float:
    ENTERED.set()
    if not GATE.wait(60):
        raise TimeoutError("the test never opened the gate")
    return 1.0
