"""Async rollouts: a background thread generates and scores the next batch while the learner trains
on the current one, and a staleness filter decides which samples a step may train on.

Timeline with ``rollout_prefetch`` = 1 (the default): the learner takes batch k (sampled by version
v), immediately submits batch k+1 (sampled by v, since v+1 is not pushed yet), trains on batch k and
pushes v+1; batch k+1 is then trained by version v+1: one version of lag, overlapping generation
with training. Each extra prefetched batch can add one more version of lag.

Staleness: a sample's lag is ``training_version - sample.policy_version`` where the training version
is the version of the weights the update starts from (the proximal policy). Samples over
``max_policy_lag`` are either dropped (``stale_policy='drop'``: the step waits for fresher samples to
refill the batch) or kept with loss weight ``stale_downweight ** (lag - max_policy_lag)``. Samples
stay grouped by prompt (GRPO/RLOO baselines need the whole group), and a group is as stale as its
oldest sample. Correction for the remaining lag is the trainer's job (decoupled PPO, ``ppo.py``).

With the learner's background push (``Learner._publish_in_background``), version v+1 may still be
on its way to the generators when batch k+2 is requested: the ``barrier`` callback returns that
push's future, and the rollout thread waits for it before generating, so the batch is sampled by
v+1 as it would be with a blocking push. The learner does not wait; only the rollout thread does.

Prompts are drawn by the learner's thread (``draw`` callback, under the learner's lock) and handed
to the rollout thread, so the prompt position stays owned by one thread. A checkpoint therefore
counts prefetched prompts as consumed: resuming an async run skips the in-flight batch's prompts.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from flywheel.learner.prompts import PromptItem
from flywheel.learner.rollout import GeneratedBatch, Stopped
from flywheel.learner.trainer import Rollout

log = logging.getLogger(__name__)

HISTORY = 1024  # trained batches remembered (tests and debugging read them)


class RolloutSource(Protocol):
    def generate(self, prompts: list[PromptItem], seed: int) -> GeneratedBatch: ...

    def score(self, prompt_texts: list[str], completion_texts: list[str]) -> tuple[list[float], int]: ...


@dataclass
class ScoredBatch:
    """A generated batch with its rewards, as the rollout thread produced it."""

    batch: GeneratedBatch
    scores: list[float]
    rm_version: int
    seconds_generate: float
    seconds_score: float


@dataclass
class SampleGroup:
    """The ``samples_per_prompt`` completions of one prompt (kept together through filtering)."""

    prompt: PromptItem
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completion_texts: list[str]
    behaviour_logprobs: list[list[float]]
    truncated: list[bool]
    policy_versions: list[int]
    scores: list[float]
    rm_version: int

    def lag(self, training_version: int) -> int:
        """Versions between the oldest sample and the policy being trained (never negative)."""
        return max(0, training_version - min(self.policy_versions))


def split_groups(scored: ScoredBatch, n: int) -> list[SampleGroup]:
    """A scored batch as per-prompt groups of ``n`` adjacent rows."""
    b = scored.batch
    return [
        SampleGroup(prompt, b.prompt_ids[i * n:(i + 1) * n], b.completion_ids[i * n:(i + 1) * n],
                    b.completion_texts[i * n:(i + 1) * n], b.behaviour_logprobs[i * n:(i + 1) * n],
                    b.truncated[i * n:(i + 1) * n], b.policy_versions[i * n:(i + 1) * n],
                    scored.scores[i * n:(i + 1) * n], scored.rm_version)
        for i, prompt in enumerate(b.prompts)
    ]


@dataclass
class Selection:
    """What one step trains on, and what the filter threw away."""

    groups: list[SampleGroup]
    sample_weights: list[float]
    lags: list[int]  # per trained sample
    dropped_lags: list[int] = field(default_factory=list)  # per dropped sample

    @property
    def sample_versions(self) -> list[int]:
        return [v for g in self.groups for v in g.policy_versions]

    def rollout(self) -> Rollout:
        gs = self.groups
        return Rollout(
            [p for g in gs for p in g.prompt_ids], [c for g in gs for c in g.completion_ids],
            [s for g in gs for s in g.scores], [t for g in gs for t in g.truncated],
            [lp for g in gs for lp in g.behaviour_logprobs], self.sample_versions, list(self.sample_weights),
        )

    def generated_batch(self) -> GeneratedBatch:
        gs = self.groups
        return GeneratedBatch(
            [g.prompt for g in gs], [p for g in gs for p in g.prompt_ids], [c for g in gs for c in g.completion_ids],
            [t for g in gs for t in g.completion_texts], [lp for g in gs for lp in g.behaviour_logprobs],
            [t for g in gs for t in g.truncated], self.sample_versions,
        )


def select_groups(
    buffer: list[SampleGroup], training_version: int, prompts_per_step: int, max_policy_lag: int,
    stale_policy: str, stale_downweight: float,
) -> tuple[Selection | None, list[SampleGroup], list[int]]:
    """Filters ``buffer`` for a step training ``training_version``.

    Returns (the selection, or None while too few usable groups; the groups left for later; the
    lags of samples dropped now). Pure: the caller owns the buffer.
    """
    dropped: list[int] = []
    usable: list[SampleGroup] = []
    for group in buffer:
        lag = group.lag(training_version)
        if lag > max_policy_lag and stale_policy == "drop":
            dropped += [lag] * len(group.policy_versions)
        else:
            usable.append(group)
    if len(usable) < prompts_per_step:
        return None, usable, dropped
    chosen, rest = usable[:prompts_per_step], usable[prompts_per_step:]
    lags = [max(0, training_version - v) for g in chosen for v in g.policy_versions]
    weights = [1.0 if lag <= max_policy_lag else stale_downweight ** (lag - max_policy_lag) for lag in lags]
    all_one = all(w == 1.0 for w in weights)
    return Selection(chosen, [] if all_one else weights, lags, dropped), rest, dropped


@dataclass
class TrainedBatch:
    """One update's record: the version it trained from and the versions of its samples."""

    training_version: int
    sample_versions: list[int]
    dropped_versions: list[int]


Draw = Callable[[], tuple[list[PromptItem], int]]


class AsyncRollouts:
    """Prefetches scored batches on a background thread; ``next_selection`` hands out filtered steps."""

    def __init__(self, source: RolloutSource, config: Any, stop: threading.Event,
                 barrier: Callable[[], concurrent.futures.Future[Any] | None] | None = None) -> None:
        self.source = source
        self.config = config
        self.stop = stop
        self.barrier = barrier  # what a batch requested now must wait for before it generates
        self.buffer: list[SampleGroup] = []
        self.history: deque[TrainedBatch] = deque(maxlen=HISTORY)
        self.in_flight = 0
        self._epoch = 0  # bumped by discard(): results of older epochs are thrown away
        self._requests: queue.Queue[tuple[int, list[PromptItem], int, concurrent.futures.Future[Any] | None] | None] = (
            queue.Queue())
        self._results: queue.Queue[tuple[int, ScoredBatch | BaseException]] = queue.Queue()
        self._thread = threading.Thread(target=self._produce, name="learner-rollouts", daemon=True)
        self._thread.start()

    # --- the rollout thread -----------------------------------------------------------------
    def _produce(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            epoch, prompts, seed, wait_for = request
            if wait_for is not None:
                # Its outcome is the learner's business (it raises there); a failed push just means
                # this batch samples the version the generators still serve.
                concurrent.futures.wait([wait_for])
            try:
                self._results.put((epoch, self._rollout(prompts, seed)))
            except BaseException as exc:  # handed to the learner's thread, which decides
                self._results.put((epoch, exc))

    def _rollout(self, prompts: list[PromptItem], seed: int) -> ScoredBatch:
        start = time.perf_counter()
        batch = self.source.generate(prompts, seed)
        generated = time.perf_counter()
        n = self.config.samples_per_prompt
        scores, rm_version = self.source.score([p.reward_text for p in batch.prompts for _ in range(n)],
                                               batch.completion_texts)
        return ScoredBatch(batch, scores, rm_version, generated - start, time.perf_counter() - generated)

    # --- the learner's side ----------------------------------------------------------------
    def _fill(self, draw: Draw) -> None:
        while self.in_flight < self.config.rollout_prefetch:
            prompts, seed = draw()
            self._requests.put((self._epoch, prompts, seed, self.barrier() if self.barrier is not None else None))
            self.in_flight += 1

    def _take(self) -> ScoredBatch | None:
        """The oldest submitted batch (None if it was discarded); raises what the rollout raised."""
        while True:
            try:
                epoch, result = self._results.get(timeout=0.5)
                break
            except queue.Empty:
                if self.stop.is_set():
                    raise Stopped("stopped while waiting for a rollout") from None
        self.in_flight -= 1
        if epoch != self._epoch:
            return None
        if isinstance(result, BaseException):
            raise result
        return result

    def next_selection(self, training_version: int, draw: Draw) -> tuple[Selection, list[ScoredBatch]]:
        """Blocks until a full step of samples usable by ``training_version`` is ready; returns it and
        the batches received meanwhile. Leaves ``rollout_prefetch`` batches generating."""
        cfg = self.config
        received: list[ScoredBatch] = []
        dropped: list[int] = []
        while True:
            selection, self.buffer, newly_dropped = select_groups(
                self.buffer, training_version, cfg.prompts_per_step, cfg.max_policy_lag, cfg.stale_policy,
                cfg.stale_downweight,
            )
            dropped += newly_dropped
            self._fill(draw)  # overlap: the next batch generates while this one trains
            if selection is not None:
                selection.dropped_lags = dropped
                self.history.append(TrainedBatch(training_version, selection.sample_versions,
                                                 [training_version - lag for lag in dropped]))
                return selection, received
            scored = self._take()
            if scored is not None:
                received.append(scored)
                self.buffer += split_groups(scored, cfg.samples_per_prompt)

    def discard(self) -> None:
        """Forgets buffered and in-flight samples (after a rollback they come from an abandoned policy)."""
        self._epoch += 1
        self.buffer.clear()

    def close(self) -> None:
        self._requests.put(None)
