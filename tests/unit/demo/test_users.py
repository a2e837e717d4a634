"""The simulated users' decisions, pacing and one visit against a stand-in client."""

from __future__ import annotations

import random
import threading
from collections import deque
from typing import Any

from flywheel.demo.users import Choice, RateLimiter, SimulatedUsers, UserSettings, choose, thumb
from flywheel_client import AckStatus, ClientConfig, EventAck, GeneratedCompletion, GenerateResult


def test_choose_prefers_the_best_over_the_worst() -> None:
    assert choose([0.1, 0.9, -0.5, 0.3]) == Choice(chosen=1, rejected=2, margin=1.4)
    assert choose([2.0, 1.0]) == Choice(0, 1, 1.0)


def test_choose_stays_silent_on_ties_and_single_answers() -> None:
    assert choose([0.5, 0.5, 0.5]) is None
    assert choose([0.5]) is None
    assert choose([]) is None
    assert choose([0.50, 0.55], min_margin=0.1) is None
    assert choose([0.50, 0.75], min_margin=0.1) == Choice(1, 0, 0.25)


def test_thumb_is_relative_to_the_users_recent_scores() -> None:
    assert thumb(1.0, []) is None
    assert thumb(0.9, [0.1, 0.5, 0.7]) == "up"
    assert thumb(0.2, [0.1, 0.5, 0.7]) == "down"
    assert thumb(0.5, [0.1, 0.5, 0.7]) is None


def test_rate_limiter_stops_waiting_when_told() -> None:
    limiter = RateLimiter(rate=0.001, burst=1)
    stop = threading.Event()
    assert limiter.acquire(stop)  # the burst token
    stop.set()
    assert not limiter.acquire(stop)  # no token for ~1000 s, but the stop wins


class FakeClient:
    """Records what a user sends; generates fixed answers."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.comparisons: list[tuple[str, str]] = []
        self.ratings: list[tuple[str, str]] = []

    def generate(self, prompt: str, **kwargs: Any) -> GenerateResult:
        assert kwargs["n"] == len(self.texts)
        completions = [GeneratedCompletion(f"c{i}", t, policy_version=3) for i, t in enumerate(self.texts)]
        return GenerateResult("0", [], completions)

    def compare(self, chosen: str, rejected: str, **kwargs: Any) -> EventAck:
        self.comparisons.append((chosen, rejected))
        return EventAck("k", AckStatus.ACCEPTED)

    def rate(self, completion_id: str, thumb: str, **kwargs: Any) -> EventAck:
        self.ratings.append((completion_id, thumb))
        return EventAck("k", AckStatus.ACCEPTED)


def test_a_visit_compares_by_the_hidden_preference_and_counts() -> None:
    client = FakeClient(["meh", "wonderful", "awful", "ok"])
    preference = {"meh": 0.0, "wonderful": 1.0, "awful": -1.0, "ok": 0.2}.__getitem__
    users = SimulatedUsers(ClientConfig(), preference, ["the movie was"], UserSettings(rate_fraction=1.0))
    recent: deque[float] = deque([0.1])
    users.visit(client, "u", random.Random(0), recent)  # type: ignore[arg-type]
    assert client.comparisons == [("c1", "c2")]
    assert sorted(client.ratings) == [("c0", "down"), ("c1", "up"), ("c2", "down"), ("c3", "up")]
    assert users.stats.comparisons == 1 and users.stats.generations == 1
    assert users.stats.mean_score_by_version() == {3: (0.05, 4)}


def test_a_visit_with_tied_answers_sends_no_comparison() -> None:
    client = FakeClient(["same", "same"])
    users = SimulatedUsers(ClientConfig(), lambda text: 0.0, ["p"], UserSettings(samples=2, rate_fraction=0.0))
    users.visit(client, "u", random.Random(0), deque())  # type: ignore[arg-type]
    assert client.comparisons == [] and client.ratings == []
    assert users.stats.ties == 1
