"""Simulated users: threads that use the SDK like a production app would. Each asks the generator for
two answers to a prompt, judges them by the hidden preference, and sends a comparison (the better one
chosen) and now and then a thumb. Together they stay under a shared request rate.
"""

from __future__ import annotations

import logging
import random
import statistics
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flywheel_client import ClientConfig, FlywheelClient, FlywheelError

log = logging.getLogger(__name__)

Judge = Callable[[str], float]
RECENT_SCORES = 200  # the live view's moving average of the users' preference score


# --- the users' decisions (pure, unit-tested) -----------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """Which of the completions a user prefers, and by how much (in preference units)."""

    chosen: int
    rejected: int
    margin: float


def choose(scores: Sequence[float], min_margin: float = 0.0) -> Choice | None:
    """The best completion over the worst, or None when they tie within ``min_margin`` (a user who
    cannot tell them apart says nothing rather than a coin flip that would teach the RM noise)."""
    if len(scores) < 2:
        return None
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    margin = scores[best] - scores[worst]
    if margin <= min_margin:
        return None
    return Choice(best, worst, margin)


def thumb(score: float, recent: Sequence[float]) -> str | None:
    """'up' above the median of the user's recent scores, 'down' below it, None when equal or no
    history: preferences have no common scale, so users rate relative to what they have seen."""
    if not recent:
        return None
    median = statistics.median(recent)
    if score > median:
        return "up"
    if score < median:
        return "down"
    return None


# --- pacing ---------------------------------------------------------------------------------------
class RateLimiter:
    """A token bucket shared by the users: at most ``rate`` acquisitions per second on average."""

    def __init__(self, rate: float, burst: int = 1) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = time.monotonic()
        self.lock = threading.Lock()

    def acquire(self, stop: threading.Event) -> bool:
        """Waits for a token; False when ``stop`` is set first."""
        while not stop.is_set():
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return True
                delay = (1 - self.tokens) / self.rate
            stop.wait(delay)
        return False


# --- the users --------------------------------------------------------------------------------------
@dataclass
class UserStats:
    """What the users did so far (shared by the user threads under ``lock``)."""

    generations: int = 0
    comparisons: int = 0
    ties: int = 0
    thumbs_up: int = 0
    thumbs_down: int = 0
    errors: int = 0
    last_error: str = ""
    scores_by_version: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    recent_scores: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_SCORES))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def mean_score_by_version(self) -> dict[int, tuple[float, int]]:
        """Mean preference score of the answers each policy version served, and how many."""
        with self.lock:
            return {v: (sum(s) / len(s), len(s)) for v, s in sorted(self.scores_by_version.items()) if s}


@dataclass(frozen=True)
class UserSettings:
    """How the simulated users behave."""

    users: int = 4
    """Concurrent users (threads)."""
    requests_per_second: float = 16.0
    """Generate calls per second, all users together."""
    samples: int = 4
    """Answers asked for per prompt (n); the best is compared against the worst."""
    max_new_tokens: int = 10
    """Answer length limit."""
    rate_fraction: float = 0.1
    """Share of answers that also get a thumb."""
    min_margin: float = 0.0
    """Score differences at or below this are ties (no comparison sent)."""
    seed: int = 0
    """Seeds the users' prompt choices and thumbs."""


class SimulatedUsers:
    """Starts ``settings.users`` threads generating and giving feedback until ``stop()``."""

    def __init__(self, client_config: ClientConfig, judge: Judge, prompts: Sequence[str],
                 settings: UserSettings) -> None:
        if not prompts:
            raise ValueError("simulated users need at least one prompt")
        self.client_config = client_config
        self.judge = judge
        self.prompts = list(prompts)
        self.settings = settings
        self.stats = UserStats()
        self.limiter = RateLimiter(settings.requests_per_second, burst=settings.users)
        self.stop_event = threading.Event()
        self.fatal: BaseException | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.settings.users):
            thread = threading.Thread(target=self._run_user, args=(i,), name=f"demo-user-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the users after their current request (their clients flush on close)."""
        self.stop_event.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def _run_user(self, index: int) -> None:
        rng = random.Random(self.settings.seed * 7919 + index)
        recent: deque[float] = deque(maxlen=50)
        try:
            with FlywheelClient(self.client_config) as client:
                while self.limiter.acquire(self.stop_event):
                    try:
                        self.visit(client, f"demo-user-{index}", rng, recent)
                    except FlywheelError as exc:
                        with self.stats.lock:
                            self.stats.errors += 1
                            self.stats.last_error = str(exc)
                        log.warning("demo-user-%d: %s", index, exc)
        except Exception as exc:  # a broken preference function: the demo stops with this error
            self.fatal = exc
            self.stop_event.set()

    def visit(self, client: FlywheelClient, user_id: str, rng: random.Random, recent: deque[float]) -> None:
        """One user interaction: generate, judge, compare, maybe thumb."""
        s = self.settings
        answer = client.generate(rng.choice(self.prompts), n=s.samples, max_new_tokens=s.max_new_tokens,
                                 temperature=1.0, user_id=user_id)
        completions = [c for c in answer.completions if c.completion_id]
        scores = [self.judge(c.text) for c in completions]
        with self.stats.lock:
            self.stats.generations += 1
            for c, score in zip(completions, scores, strict=True):
                self.stats.scores_by_version[c.policy_version].append(score)
                self.stats.recent_scores.append(score)
        choice = choose(scores, s.min_margin)
        if choice is None:
            with self.stats.lock:
                self.stats.ties += 1
        else:
            ack = client.compare(completions[choice.chosen].completion_id,
                                 completions[choice.rejected].completion_id, user_id=user_id)
            if ack.stored:
                with self.stats.lock:
                    self.stats.comparisons += 1
        for c, score in zip(completions, scores, strict=True):
            verdict = thumb(score, recent) if rng.random() < s.rate_fraction else None
            recent.append(score)
            if verdict is not None and client.rate(c.completion_id, thumb=verdict, user_id=user_id).stored:  # type: ignore[arg-type]
                with self.stats.lock:
                    setattr(self.stats, f"thumbs_{verdict}", getattr(self.stats, f"thumbs_{verdict}") + 1)
