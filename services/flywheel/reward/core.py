"""The reward service's logic, free of gRPC: scorer sets, batching, normalisation, version swaps.

A request names a scorer set; each component of the set scores every sample, the raw reward is
the weighted sum, and the final reward is ``clip((raw - mean) / std)`` with the numbers reported
in ``Normalization`` (mean 0 and std 1 when normalisation is off, so the formula always holds).
Reward-model components go through the dynamic batcher, merged with other callers' samples;
rule components run in the caller's thread (``score``) or, for the asyncio server
(``score_async``), on the event loop when they are built-ins and in a worker thread when they are
user code that may block.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from flywheel.common.aio import LoopBridge
from flywheel.common.batching import BatcherClosed, DynamicBatcher, QueueFull, RequestDropped
from flywheel.reward.config import DEFAULT_SET, RewardConfig, ScorerSpec
from flywheel.reward.metrics import RewardMetrics
from flywheel.reward.model_scorer import RewardModel, WeightMismatch
from flywheel.reward.scorers import RuleScorer, Sample, build_rule_scorer

log = logging.getLogger(__name__)

MAX_SAMPLE_ID_CHARS = 256
# A request bigger than one batch can straddle a weight swap; it is rescored this often at most.
_VERSION_RETRIES = 3


class InvalidRequest(ValueError):
    """The request is malformed; the message names the field, the index and the limit."""


class Overloaded(RuntimeError):
    """The scoring queue is full; retry after ``retry_after_ms``."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class NotReady(RuntimeError):
    """The model is not loaded yet, or the service is shutting down."""


class RequestCancelled(RuntimeError):
    """The caller went away (cancelled or deadline passed) before its samples were scored."""


class ScoreTimeout(TimeoutError):
    """The request's deadline passed while it waited for the model."""


class UpdateRejected(RuntimeError):
    """A reward-model update was refused; nothing changed. ``status`` is a grpc.StatusCode name."""

    def __init__(self, message: str, reason: str, status: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Normalization:
    enabled: bool
    mean: float
    std: float
    clip: float
    count: int


@dataclass(frozen=True)
class ScoredSample:
    sample_id: str
    reward: float
    raw_reward: float
    components: dict[str, float]


@dataclass(frozen=True)
class ScoreResult:
    scores: list[ScoredSample]
    model_version: int
    normalization: Normalization


@dataclass(frozen=True)
class UpdateResult:
    version: int
    previous_version: int
    tensors_updated: int
    swapped_at: datetime


@dataclass(frozen=True)
class ScorerDescription:
    name: str
    kind: str  # "model", "rule" or "mix"
    weight: float
    source: str


@dataclass(frozen=True)
class ModelInfo:
    model_version: int
    model_id: str
    scorers: list[ScorerDescription]
    last_push_time: datetime | None
    normalization: Normalization
    metadata: dict[str, str]


@dataclass
class RunningStats:
    """Welford's running mean and variance: numerically stable, O(1) memory."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: Sequence[float]) -> None:
        for x in values:
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 0.0


def _one_version(results: list[tuple[float, int]]) -> tuple[list[float], int] | None:
    """(values, version) when one model version scored every sample; None when a request split
    across batches straddled a weight swap (it is then scored again: one response, one version)."""
    versions = {v for _, v in results}
    if len(versions) == 1:
        return [value for value, _ in results], versions.pop()
    log.info("request straddled reward-model versions %s; rescoring", sorted(versions))
    return None


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("the request's deadline passed"))


def _transform(normalize: bool, mean: float, std: float) -> tuple[float, float]:
    """The (mean, std) a reward is normalised with: identity when off; only centring until the
    running stats have spread to divide by."""
    if not normalize:
        return 0.0, 1.0
    return mean, (std if std > 1e-8 else 1.0)


@dataclass
class _Component:
    spec: ScorerSpec
    rule: RuleScorer | None  # None: the reward model


@dataclass
class _ScorerSet:
    name: str
    components: list[_Component]
    stats: RunningStats = field(default_factory=RunningStats)

    # Asked on every request; the components never change: worked out once.
    @functools.cached_property
    def uses_model(self) -> bool:
        return any(c.rule is None for c in self.components)

    @functools.cached_property
    def blocking_rules(self) -> bool:
        return any(c.rule is not None and c.rule.blocking for c in self.components)


class RewardService:
    """Scores samples with named scorer sets and takes versioned reward-model updates."""

    def __init__(self, config: RewardConfig, metrics: RewardMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or RewardMetrics(max_batch_size=config.max_batch_size)
        # Rule scorers are built here, so a bad module:function fails before the port opens.
        self.sets = {
            name: _ScorerSet(name, [_Component(s, None if s.kind == "model" else build_rule_scorer(s)) for s in specs])
            for name, specs in config.scorer_sets().items()
        }
        self.model = (
            RewardModel(config.model, config.device, config.dtype, config.max_length_tokens, config.torch_threads)
            if config.model
            else None
        )
        self.batcher: DynamicBatcher[tuple[str, str], tuple[float, int]] | None = None
        self._stats_lock = threading.Lock()
        self._swap_lock = threading.Lock()
        self.last_push_time: datetime | None = None
        self.metadata: dict[str, str] = {}
        self.version_listeners: list[Callable[[ModelInfo], None]] = []
        self._bridge: LoopBridge | None = None

    # --- lifecycle ----------------------------------------------------------------------------
    def load(self) -> None:
        """Loads the reward model and starts the batcher (slow: run it from the server's on_load)."""
        if self.model is not None:
            self.model.load()
            m = self.metrics
            self.batcher = DynamicBatcher(
                self.model.score_batch,
                self.config.max_batch_size,
                self.config.max_wait_ms,
                self.config.max_queue,
                name="reward",
                on_batch=m.observe_batch,
                on_queue_depth=m.queue_depth.set,
                on_drop=m.dropped.inc,
            )
        self.metrics.model_version.set(self.model_version)
        self._notify_version()

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    @property
    def model_version(self) -> int:
        return self.model.version if self.model is not None else 0

    # --- scoring ------------------------------------------------------------------------------
    def validate(self, samples: Sequence[Sample], scorer: str) -> _ScorerSet:
        """Returns the scorer set, or raises InvalidRequest naming the field, index and limit."""
        cfg = self.config
        name = scorer or DEFAULT_SET
        if name not in self.sets:
            raise InvalidRequest(f"scorer {name!r} is not configured here; configured sets: {', '.join(self.sets)}")
        if not samples:
            raise InvalidRequest("samples is empty: send at least one (prompt, completion) sample")
        if len(samples) > cfg.max_samples_per_request:
            raise InvalidRequest(
                f"samples has {len(samples)} entries; the limit is {cfg.max_samples_per_request} "
                "(max_samples_per_request): split the request"
            )
        for i, s in enumerate(samples):
            for field_name, text, limit in (
                ("prompt", s.prompt, cfg.max_text_chars),
                ("completion", s.completion, cfg.max_text_chars),
                ("sample_id", s.sample_id, MAX_SAMPLE_ID_CHARS),
            ):
                if len(text) > limit:
                    raise InvalidRequest(
                        f"samples[{i}].{field_name} has {len(text)} characters; the limit is {limit}"
                    )
        return self.sets[name]

    def score(
        self,
        samples: Sequence[Sample],
        scorer: str = "",
        timeout: float | None = None,
        is_active: Callable[[], bool] | None = None,
        on_cancel: Callable[[Callable[[], object]], bool] | None = None,
    ) -> ScoreResult:
        """Scores ``samples`` with the set ``scorer`` ('' = default), blocking. ``timeout`` bounds the
        wait for the model; ``is_active`` and ``on_cancel`` (see DynamicBatcher.submit) let the
        batcher drop the request when its caller has gone."""
        start = time.perf_counter()
        scorer_set = self.validate(samples, scorer)
        model_values: list[float] = []
        version = self.model_version
        if scorer_set.uses_model:
            model_values, version = self._model_scores(samples, timeout, is_active, on_cancel)
        rules = self._rule_scores(scorer_set, samples)
        return self._combine(scorer_set, samples, model_values, rules, version, start)

    async def score_async(
        self, samples: Sequence[Sample], scorer: str = "", timeout: float | None = None
    ) -> ScoreResult:
        """``score`` for an asyncio server: the wait for the model is awaited, and cancelling the
        awaiting task drops the request from the batch if it has not run yet."""
        start = time.perf_counter()
        scorer_set = self.validate(samples, scorer)
        model_values: list[float] = []
        version = self.model_version
        if scorer_set.uses_model:
            model_values, version = await self._model_scores_async(samples, timeout)
        if scorer_set.blocking_rules:  # user code: keep it off the event loop
            rules = await asyncio.to_thread(self._rule_scores, scorer_set, samples)
        else:
            rules = self._rule_scores(scorer_set, samples)
        return self._combine(scorer_set, samples, model_values, rules, version, start)

    @staticmethod
    def _rule_scores(scorer_set: _ScorerSet, samples: Sequence[Sample]) -> dict[str, list[float]]:
        return {c.spec.name: c.rule(samples) for c in scorer_set.components if c.rule is not None}

    def _combine(
        self,
        scorer_set: _ScorerSet,
        samples: Sequence[Sample],
        model_values: list[float],
        rules: dict[str, list[float]],
        version: int,
        start: float,
    ) -> ScoreResult:
        components = {
            c.spec.name: model_values if c.rule is None else rules[c.spec.name] for c in scorer_set.components
        }
        raw = [
            math.fsum(c.spec.weight * components[c.spec.name][i] for c in scorer_set.components)
            for i in range(len(samples))
        ]
        rewards, norm = self._postprocess(scorer_set, raw)
        scores = [
            ScoredSample(s.sample_id, rewards[i], raw[i], {k: v[i] for k, v in components.items()})
            for i, s in enumerate(samples)
        ]
        self.metrics.samples.labels(scorer_set.name).inc(len(samples))
        self.metrics.scoring_latency.labels(scorer_set.name).observe(time.perf_counter() - start)
        return ScoreResult(scores, version, norm)

    @contextlib.contextmanager
    def _batcher_errors(self) -> Iterator[None]:
        """The batcher's exceptions as the service's."""
        try:
            yield
        except QueueFull as exc:
            self.metrics.rejected.labels("queue_full").inc()
            raise Overloaded(
                f"reward scoring queue is full ({exc}); retry after {exc.retry_after_ms} ms", exc.retry_after_ms
            ) from exc
        except TimeoutError as exc:
            raise ScoreTimeout("the deadline passed while the request waited for the reward model") from exc
        except RequestDropped as exc:
            raise RequestCancelled(str(exc)) from exc
        except BatcherClosed as exc:
            raise NotReady("the reward service is shutting down") from exc

    def _batch_pairs(self, samples: Sequence[Sample]) -> list[tuple[str, str]]:
        if self.batcher is None:
            raise NotReady("the reward model is not loaded yet; retry when the server reports SERVING")
        return [(s.prompt, s.completion) for s in samples]

    def _model_scores(
        self,
        samples: Sequence[Sample],
        timeout: float | None,
        is_active: Callable[[], bool] | None,
        on_cancel: Callable[[Callable[[], object]], bool] | None,
    ) -> tuple[list[float], int]:
        pairs = self._batch_pairs(samples)
        assert self.batcher is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        for _attempt in range(_VERSION_RETRIES):
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            with self._batcher_errors():
                results = self.batcher.submit(pairs, remaining, is_active, on_cancel)
            if (one := _one_version(results)) is not None:
                return one
        raise NotReady("the reward model changed version during scoring several times; retry")

    async def _model_scores_async(self, samples: Sequence[Sample], timeout: float | None) -> tuple[list[float], int]:
        pairs = self._batch_pairs(samples)
        assert self.batcher is not None
        loop = asyncio.get_running_loop()
        if self._bridge is None or self._bridge.loop is not loop:
            self._bridge = LoopBridge(loop)
        deadline = None if timeout is None else loop.time() + timeout
        for _attempt in range(_VERSION_RETRIES):
            with self._batcher_errors():
                future = self.batcher.submit_async(pairs)
                waiter = self._bridge.wrap(future)
                # A timer, not asyncio.wait_for: that wraps the wait in a task of its own per call.
                timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
                try:
                    results = await waiter
                except BaseException:  # deadline, RPC cancelled, batch failed: drop it if still queued
                    future.cancel()
                    raise
                finally:
                    if timer is not None:
                        timer.cancel()
            if (one := _one_version(results)) is not None:
                return one
        raise NotReady("the reward model changed version during scoring several times; retry")

    def _postprocess(self, scorer_set: _ScorerSet, raw: list[float]) -> tuple[list[float], Normalization]:
        cfg = self.config
        with self._stats_lock:  # update and snapshot together: a request sees one set of stats
            stats = scorer_set.stats
            stats.update(raw)
            count, mean, std = stats.count, stats.mean, stats.std
        self.metrics.reward_mean.labels(scorer_set.name).set(mean)
        self.metrics.reward_std.labels(scorer_set.name).set(std)
        used_mean, used_std = _transform(cfg.normalize, mean, std)
        rewards = [(r - used_mean) / used_std for r in raw]
        if cfg.clip > 0:
            rewards = [min(max(r, -cfg.clip), cfg.clip) for r in rewards]
        return rewards, Normalization(cfg.normalize, used_mean, used_std, cfg.clip, count)

    # --- model updates ------------------------------------------------------------------------
    def weights_snapshot(self) -> tuple[dict[str, Any], int]:
        """The current tensors and version, the base a push is staged against."""
        if self.model is None:
            raise UpdateRejected("this deployment has no reward model (model=''): nothing to update",
                                 "no_model", "FAILED_PRECONDITION")
        with self.model.lock:
            return self.model.state(), self.model.version

    def swap_weights(
        self,
        tensors: Mapping[str, Any],
        version: int,
        *,
        full: bool,
        expected_version: int,
        metadata: Mapping[str, str] | None = None,
    ) -> UpdateResult:
        """Checks and swaps in ``tensors`` as ``version`` between two batches. ``expected_version``
        is the version the update was staged against: if another update landed meanwhile, refuse."""
        if self.model is None:
            raise UpdateRejected("this deployment has no reward model (model='')", "no_model", "FAILED_PRECONDITION")
        with self._swap_lock:
            previous = self.model.version
            if previous != expected_version:
                raise UpdateRejected(
                    f"another update made version {previous} while this one was staged against "
                    f"{expected_version}; push again", "conflict", "ABORTED",
                )  # fmt: skip
            if version <= previous:
                raise UpdateRejected(
                    f"version {version} is not newer than the current version {previous}",
                    "stale_version", "FAILED_PRECONDITION",
                )  # fmt: skip
            try:
                count = self.model.load_tensors(tensors, version, full)
            except WeightMismatch as exc:
                raise UpdateRejected(str(exc), exc.reason, "INVALID_ARGUMENT") from exc
            self.last_push_time = datetime.now(timezone.utc)
            self.metadata = dict(metadata or {})
        self.metrics.model_version.set(version)
        self.metrics.pushes.inc()
        log.info("reward model version %d -> %d (%d tensors)", previous, version, count)
        self._notify_version()
        return UpdateResult(version, previous, count, self.last_push_time)

    def _notify_version(self) -> None:
        info = self.describe()
        for listener in self.version_listeners:
            try:
                listener(info)
            except Exception:  # persistence is best effort: the swap has happened either way
                log.exception("reward-model version listener failed")

    # --- description --------------------------------------------------------------------------
    def describe(self) -> ModelInfo:
        scorers: list[ScorerDescription] = []
        for s in self.sets.values():
            mix = " + ".join(f"{c.spec.weight:g}*{c.spec.name}" for c in s.components)
            scorers.append(ScorerDescription(s.name, "mix", 1.0, mix))
            for c in s.components:
                kind, source = ("model", self.config.model) if c.rule is None else ("rule", c.rule.source)
                scorers.append(ScorerDescription(f"{s.name}.{c.spec.name}", kind, c.spec.weight, source))
        default = self.sets[DEFAULT_SET].stats
        with self._stats_lock:
            mean, std = _transform(self.config.normalize, default.mean, default.std)
            norm = Normalization(self.config.normalize, mean, std, self.config.clip, default.count)
        return ModelInfo(self.model_version, self.config.model, scorers, self.last_push_time, norm,
                         dict(self.metadata))
