"""The learner: a background training loop (generate -> score -> train -> push -> checkpoint) with
pause/resume, status, metrics and exact resume from checkpoints. No grpc here; the servicer adapts it.

Failures never kill the loop: an unreachable service makes the rollout wait (phase WAITING with the
reason), any other error abandons the step, logs it and backs off before the next attempt.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from flywheel.learner import checkpoint as ckpt
from flywheel.learner.async_rollouts import AsyncRollouts
from flywheel.learner.config import LearnerConfig
from flywheel.learner.feedback_learning import FeedbackLearning
from flywheel.learner.guard import eval_prompts, evaluate_served_policy, guard_violation
from flywheel.learner.metrics import LearnerMetrics, MetricsLog
from flywheel.learner.models import load_models
from flywheel.learner.prompts import NoPrompts, PromptItem, PromptSource
from flywheel.learner.publish import PolicyPublisher, PushReport
from flywheel.learner.registry import PolicyEntry, UnknownVersion
from flywheel.learner.rollout import GeneratedBatch, Stopped
from flywheel.learner.trainer import Rollout, Trainer

log = logging.getLogger(__name__)


class RolloutSource(Protocol):
    """Where completions and rewards come from (gRPC services, or in-process for benches)."""

    def generate(self, prompts: list[PromptItem], seed: int) -> GeneratedBatch: ...

    def score(self, prompt_texts: list[str], completion_texts: list[str]) -> tuple[list[float], int]: ...


@dataclass
class LearnerStatus:
    step: int = 0
    policy_version: int = 0
    phase: str = "starting"
    paused: bool = True
    algorithm: str = "ppo"
    last_metrics: dict[str, float] = field(default_factory=dict)
    run_dir: str = ""
    last_checkpoint_path: str = ""
    last_checkpoint_time: float = 0.0
    reward_model_version: int = 0
    waiting_reason: str = ""


class Learner:
    def __init__(self, config: LearnerConfig, metrics: LearnerMetrics, redis: Any = None,
                 rollouts: RolloutSource | None = None, publisher: PolicyPublisher | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.redis = redis
        self.rollouts = rollouts
        self.publisher = publisher
        self.stop_event = threading.Event()
        self._wake = threading.Condition()
        self._lock = threading.RLock()  # model, optimizer and version: held by train/push/checkpoint
        self._thread: threading.Thread | None = None
        self.status_ = LearnerStatus(algorithm=config.algorithm, run_dir=str(Path(config.run_dir).expanduser()),
                                     phase="idle")
        self.metrics_log = MetricsLog(config.run_dir)
        self._checkpointed_step = -1
        self._pause_requested = False  # paused by Pause (phase PAUSED) rather than never started (IDLE)
        self.async_rollouts: AsyncRollouts | None = None  # mode=async: the prefetching rollout thread
        self._rollout_batches = 0  # async: batches requested (their sampling seeds)
        self._registered = False  # the version we start from is in the policy registry
        # mode=async: each version is pushed (and registered) on this thread while the next step
        # trains; at most one push is in flight (``_pending_push``), so versions land in order.
        self._push_pool: ThreadPoolExecutor | None = None
        self._pending_push: Future[PushReport] | None = None
        # A finished push whose figures no step's metrics carry yet: a checkpoint, rollback or
        # resync can be what waited for it, and the next step still reports it.
        self._unreported_push: PushReport | None = None

    # --- loading and resuming ----------------------------------------------------------------
    def load(self) -> None:
        """Loads the models (and the latest checkpoint, if any); no network calls."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.model, self.reference, self.tokenizer = load_models(
            cfg.policy_model, cfg.shared_backbone, cfg.uses_critic
        )
        pad_id = self.tokenizer.pad_token_id  # type: ignore[attr-defined]
        self.trainer = Trainer(cfg, self.model, self.reference, pad_id if pad_id is not None else 0)
        self.prompt_source = PromptSource(cfg.prompts_file, cfg.prompt_stream, self.redis, cfg.seed,
                                          cfg.prompt_stream_fraction)
        latest = ckpt.latest_checkpoint(cfg.checkpoint_dir)
        self.feedback = FeedbackLearning(cfg, self.metrics, self.redis) if cfg.feedback_learning else None
        if self.feedback is not None:
            self.feedback.load(ckpt.reward_model_dir(latest) if latest is not None else None)
        if latest is not None:
            self.restore(latest)
        self.metrics.policy_version.set(self.status_.policy_version)

    def restore(self, path: Path) -> None:
        meta = ckpt.load_meta(path)
        state = ckpt.load_state(path)
        self.model.policy.load_state_dict(ckpt.load_policy_weights(path))
        if self.model.value_head is not None and state.get("value_head") is not None:
            self.model.value_head.load_state_dict(state["value_head"])
        if self.model.critic is not None and state.get("critic") is not None:
            self.model.critic.load_state_dict(state["critic"])
        self.trainer.load_state_dict(state["trainer"])
        self.prompt_source.load_state_dict(state["prompts"])
        if self.feedback is not None and state.get("feedback") is not None:
            self.feedback.load_state_dict(state["feedback"])
        self.status_.step = int(meta["step"])
        self.status_.policy_version = int(meta["policy_version"])
        self.status_.last_checkpoint_path = str(path)
        self.status_.last_checkpoint_time = float(meta.get("saved_at", 0.0))
        self.status_.last_metrics = dict(meta.get("metrics", {}))
        self._checkpointed_step = self.status_.step
        log.info("resumed from %s: step %d, policy version %d", path, self.status_.step,
                 self.status_.policy_version)

    def save_checkpoint(self) -> Path:
        """Writes a checkpoint of the current state (atomically) and returns its path."""
        with self._lock:
            previous = self.status_.phase
            self._set_phase("checkpointing")
            start = time.perf_counter()
            self.wait_for_push()  # the version a checkpoint records has been pushed and registered
            state = {
                "value_head": self.model.value_head.state_dict() if self.model.value_head is not None else None,
                "critic": self.model.critic.state_dict() if self.model.critic is not None else None,
                "trainer": self.trainer.state_dict(),
                "prompts": self.prompt_source.state_dict(),
                "feedback": self.feedback.state_dict() if self.feedback is not None else None,
            }
            meta = {"policy_version": self.status_.policy_version, "algorithm": self.config.algorithm,
                    "policy_model": self.config.policy_model, "metrics": self.status_.last_metrics}
            path = ckpt.save_checkpoint(self.config.checkpoint_dir, self.status_.step, meta, state,
                                        self.model.policy, self.tokenizer, self.config.keep_checkpoints,
                                        self.feedback.checkpoint_model() if self.feedback is not None else None)
            if self.feedback is not None:
                self.feedback.after_checkpoint(state["feedback"])  # XACK what the checkpoint covers
            self.metrics.step_seconds.labels("checkpoint").observe(time.perf_counter() - start)
            self.status_.last_checkpoint_path = str(path)
            self.status_.last_checkpoint_time = time.time()
            self._checkpointed_step = self.status_.step
            self._set_phase(previous)
            log.info("checkpoint %s (step %d, version %d)", path, self.status_.step, self.status_.policy_version)
            return path

    # --- control -----------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the loop thread (it idles until ``resume`` unless autostart)."""
        if self.config.autostart:
            self.status_.paused = False
        self._thread = threading.Thread(target=self._run, name="learner-loop", daemon=True)
        self._thread.start()

    def pause(self, reason: str = "") -> None:
        with self._wake:
            self.status_.paused = True
            self._pause_requested = True
            self._wake.notify_all()
        log.info("pause requested%s: pausing after the current step", f" ({reason})" if reason else "")

    def resume(self) -> None:
        with self._wake:
            self.status_.paused = False
            self._wake.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Stops the loop (waits for the current step up to ``timeout``) and checkpoints new progress."""
        self.stop_event.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("learner loop still busy after %.0fs; not checkpointing at shutdown", timeout)
                return
        if self.async_rollouts is not None:
            self.async_rollouts.close()
        try:
            self.wait_for_push()
        except Exception:  # the version stays unpushed; the next run's sync pushes it
            log.exception("the last background push failed")
        if self._push_pool is not None:
            self._push_pool.shutdown()
        if hasattr(self, "trainer") and self.status_.step > self._checkpointed_step:
            self.save_checkpoint()

    def status(self) -> LearnerStatus:
        return replace(self.status_, last_metrics=dict(self.status_.last_metrics))

    def _set_phase(self, phase: str, waiting_reason: str = "") -> None:
        self.status_.phase = phase
        self.status_.waiting_reason = waiting_reason
        self.metrics.waiting.set(1 if phase == "waiting" else 0)

    def on_wait(self, reason: str) -> None:
        """Called by the rollout client before each retry of an unavailable service."""
        self.metrics.rpc_retries.labels(reason.split(" ", 1)[0]).inc()
        self._set_phase("waiting", reason)

    # --- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while not self.stop_event.is_set():
            if self._wait_while_paused():
                break
            try:
                self.run_step()
                failures = 0
            except Stopped:
                break
            except NoPrompts as exc:
                failures = self._back_off(str(exc), failures, quiet=True)
            except Exception as exc:
                log.exception("learner step %d failed", self.status_.step + 1)
                self.metrics.step_failures.inc()
                failures = self._back_off(f"step failed: {exc!r}", failures)
        self._set_phase("idle")

    def _wait_while_paused(self) -> bool:
        """Blocks while paused (or done); True when stopping."""
        with self._wake:
            while not self.stop_event.is_set():
                done = bool(self.config.total_steps) and self.status_.step >= self.config.total_steps
                if not (self.status_.paused or done):
                    return False
                if done and self.status_.step > self._checkpointed_step:
                    self.save_checkpoint()
                self._set_phase("paused" if self.status_.paused and self._pause_requested else "idle")
                self._wake.wait()
        return True

    def _back_off(self, reason: str, failures: int, quiet: bool = False) -> int:
        delay = min(self.config.rpc_max_backoff, 0.5 * 2**failures)
        (log.info if quiet else log.warning)("%s; retrying in %.1fs", reason, delay)
        self._set_phase("waiting", reason)
        self.stop_event.wait(delay)
        return failures + 1

    @contextlib.contextmanager
    def _timed(self, timings: dict[str, float], phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        timings[phase] = time.perf_counter() - start

    def run_step(self) -> dict[str, float]:
        """One step: generate -> score -> train -> push (-> checkpoint). Returns the step's metrics."""
        assert self.rollouts is not None, "no rollout source configured"
        if self.config.mode == "async":
            return self._run_async_step()
        cfg, timings = self.config, dict[str, float]()
        start = time.perf_counter()
        with self._timed(timings, "generate"):
            self._set_phase("generating")
            self._sync_replicas_if_needed()
            with self._lock:
                prompts = self.prompt_source.next_batch(cfg.prompts_per_step)
            batch = self.rollouts.generate(prompts, seed=cfg.seed * 1_000_003 + self.status_.step)
        with self._timed(timings, "score"):
            self._set_phase("scoring")
            n = cfg.samples_per_prompt
            scores, rm_version = self.rollouts.score(
                [p.reward_text for p in batch.prompts for _ in range(n)], batch.completion_texts
            )
        with self._lock:
            with self._timed(timings, "train"):
                self._set_phase("training")
                rollout = Rollout(batch.prompt_ids, batch.completion_ids, scores, batch.truncated,
                                  batch.behaviour_logprobs, batch.policy_versions)
                metrics = self.trainer.train_step(rollout)
                self._rating_update(metrics)
                self.status_.step += 1
            with self._timed(timings, "push"):
                self._set_phase("pushing")
                self._publish(metrics, rm_version)
            timings["total"] = time.perf_counter() - start
            self._finish_step(metrics, timings, batch, rm_version)
        return metrics

    def _rating_update(self, metrics: dict[str, float]) -> None:
        """rating_rewards: an off-policy update on the rated logged completions read since the last step
        (``offpolicy.py``); pushed with this step's version. Caller holds the lock."""
        if not self.config.rating_rewards or self.feedback is None:
            return
        from flywheel.learner.offpolicy import rated_samples, rating_step

        samples = rated_samples(self.feedback.take_rated())
        metrics.update(rating_step(self.trainer, samples, self.status_.policy_version))

    def _sync_replicas_if_needed(self) -> None:
        """``sync_replicas`` at the first step and whenever a push or version query failed since."""
        if self.publisher is not None and (self.publisher.needs_sync or not self._registered):
            self.sync_replicas()

    def sync_replicas(self) -> None:
        """Brings restarted/lagging replicas to the current version before they generate."""
        if self.publisher is None:
            return
        with self._lock:
            self.wait_for_push()  # a push in flight would make its replicas look one version behind
            self._register_start_version()
            version, report = self.publisher.sync(self.model.policy.state_dict(), self.status_.policy_version,
                                                  self.status_.step)
            self._set_version(version)
            if report is not None:
                self.metrics.push_bytes.inc(report.bytes_sent)
                self.metrics.push_failures.inc(len(report.failed))

    def _set_version(self, version: int) -> None:
        self.status_.policy_version = version
        self.metrics.policy_version.set(version)

    def _publish(self, metrics: dict[str, float], rm_version: int = 0) -> None:
        """Sync mode: pushes the new version (and registers it) before the next generation starts."""
        version = self.status_.policy_version + 1
        self._set_version(version)
        if self.publisher is None:
            return
        report = self._push_version(self.model.policy.state_dict(), self._lineage(version, metrics, rm_version))
        self._push_figures(metrics, report)

    def _publish_in_background(self, metrics: dict[str, float], rm_version: int = 0) -> None:
        """Async mode: hands the new version to the push thread and returns; the next step trains
        meanwhile. Waits first for the previous version's push (normally long done), whose figures
        go into this step's metrics (``push_version`` says which). The rollout thread waits for
        this push before it starts the next batch (``AsyncRollouts``' barrier), so that batch is
        sampled by the new version: the staleness is the same as with a blocking push."""
        self._report_push(metrics)
        version = self.status_.policy_version + 1
        self._set_version(version)
        if self.publisher is None:
            return
        # A private copy: training goes on changing the live weights while this one is sent. It
        # becomes the publisher's delta base afterwards, so a delta push costs no extra copy.
        state = {name: t.detach().clone() for name, t in self.model.policy.state_dict().items()}
        if self._push_pool is None:
            self._push_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="learner-push")
        self._pending_push = self._push_pool.submit(self._push_version, state,
                                                    self._lineage(version, metrics, rm_version), True)

    def wait_for_push(self) -> PushReport | None:
        """Waits for the background push in flight (async mode), if any; returns the report of the
        last finished push that no step has reported yet (None when there is none), and raises what
        the push raised. Callers hold the lock, or the loop has stopped."""
        future, self._pending_push = self._pending_push, None
        if future is not None:
            self._unreported_push = future.result()
        return self._unreported_push

    def _report_push(self, metrics: dict[str, float]) -> None:
        """Waits for the push in flight; the last finished push that no step has reported yet goes
        into ``metrics`` (``push_version`` says which)."""
        self.wait_for_push()
        report, self._unreported_push = self._unreported_push, None
        if report is not None:
            self._push_figures(metrics, report)

    def _lineage(self, version: int, metrics: dict[str, float], rm_version: int) -> PolicyEntry:
        return PolicyEntry(version, parent_version=version - 1, step=self.status_.step, reward_model_version=rm_version,
                           data_window=self._data_window(),
                           metrics={k: metrics[k] for k in ("reward_mean", "kl") if k in metrics})

    def _push_version(self, state: Mapping[str, torch.Tensor], entry: PolicyEntry, owned: bool = False) -> PushReport:
        """Pushes ``state`` as ``entry.version`` to every generator and registers it if any took it.
        Runs on the push thread in async mode: it touches the publisher and metrics, never the model."""
        assert self.publisher is not None
        from flywheel.learner.targets import resolve_targets

        report = self.publisher.push(state, entry.version, resolve_targets(self.config.generator_targets),
                                     {"step": str(entry.step), "algorithm": self.config.algorithm}, owned=owned)
        self.metrics.push_bytes.inc(report.bytes_sent)
        self.metrics.push_seconds.observe(report.seconds)
        self.metrics.push_failures.inc(len(report.failed))
        if report.ok:
            self.publisher.register(entry, state)
        return report

    @staticmethod
    def _push_figures(metrics: dict[str, float], report: PushReport) -> None:
        metrics.update(push_version=float(report.version), push_bytes=float(report.bytes_sent),
                       push_replicas_ok=float(len(report.ok)), push_seconds=report.seconds)

    def _finish_step(self, metrics: dict[str, float], timings: dict[str, float], batch: GeneratedBatch,
                     rm_version: int) -> None:
        n = len(batch.completion_ids)
        metrics["samples_per_second"] = n / max(timings["total"], 1e-9)
        metrics.update({f"seconds_{phase}": seconds for phase, seconds in timings.items()})
        lag = [self.status_.policy_version - 1 - v for v in batch.policy_versions]
        metrics["policy_lag_max"] = float(max(lag, default=0))
        self._check_guard(metrics)
        self.status_.last_metrics = dict(metrics)
        self.status_.reward_model_version = rm_version
        self.metrics.observe_step(metrics, timings, n)
        self.metrics.step.set(self.status_.step)
        self.metrics_log.write({"step": self.status_.step, "policy_version": self.status_.policy_version,
                                **metrics})
        log.info("step %d v%d reward %.3f kl %.4f entropy %.3f (%.2fs)", self.status_.step,
                 self.status_.policy_version, metrics["reward_mean"], metrics["kl"], metrics["entropy"],
                 timings["total"])
        every = self.config.checkpoint_every
        if every and self.status_.step % every == 0:
            with self._timed(timings, "checkpoint"):
                self.save_checkpoint()
        # Between steps (sync and async): a reward-model fit from production feedback, checkpointed
        # before its events are acked, then pushed to the reward replicas.
        if self.feedback is not None:
            self.feedback.run(self.status_.step, self._lock, self.model.policy, self.tokenizer,
                              self.save_checkpoint, self.metrics_log)
            self.status_.reward_model_version = max(self.status_.reward_model_version, self.feedback.rm_version)

    # --- async mode: generation of the next batch overlaps training on this one ---------------
    def _run_async_step(self) -> dict[str, float]:
        """Takes a prefetched batch filtered for staleness (the next one starts generating), trains on
        it with decoupled PPO, pushes. Holds the lock throughout, so a rollback never meets a half step."""
        assert self.rollouts is not None, "no rollout source configured"
        timings: dict[str, float] = {}
        start = time.perf_counter()
        with self._lock:
            if self.async_rollouts is None:
                self.async_rollouts = AsyncRollouts(self.rollouts, self.config, self.stop_event,
                                                    barrier=lambda: self._pending_push)
                self._rollout_batches = self.status_.step
            with self._timed(timings, "generate"):  # only the generation that training did not hide
                self._set_phase("generating")
                self._sync_replicas_if_needed()
                selection, received = self.async_rollouts.next_selection(self.status_.policy_version,
                                                                         self._draw_prompts)
            for lag in selection.lags + selection.dropped_lags:
                self.metrics.sample_staleness.observe(lag)
            self.metrics.stale_dropped.inc(len(selection.dropped_lags))
            rm_version = max(g.rm_version for g in selection.groups)
            with self._timed(timings, "train"):
                self._set_phase("training")
                metrics = self.trainer.train_step(selection.rollout())
                self._rating_update(metrics)
                self.status_.step += 1
            metrics.update(staleness_mean=sum(selection.lags) / len(selection.lags),
                           staleness_max=float(max(selection.lags)), stale_dropped=float(len(selection.dropped_lags)))
            if received:
                metrics["seconds_rollout_generate"] = sum(r.seconds_generate for r in received) / len(received)
                metrics["seconds_rollout_score"] = sum(r.seconds_score for r in received) / len(received)
            with self._timed(timings, "push"):  # only the hand-over: the push itself runs in the background
                self._set_phase("pushing")
                self._publish_in_background(metrics, rm_version)
            timings["total"] = time.perf_counter() - start
            self._finish_step(metrics, timings, selection.generated_batch(), rm_version)
        return metrics

    def _draw_prompts(self) -> tuple[list[PromptItem], int]:
        """The next batch's prompts and sampling seed (called on the learner's thread, under the lock)."""
        with self._lock:
            prompts = self.prompt_source.next_batch(self.config.prompts_per_step)
            seed = self.config.seed * 1_000_003 + self._rollout_batches
            self._rollout_batches += 1
        return prompts, seed

    # --- policy registry: lineage, promotion, rollback, guard -------------------------------------
    def _data_window(self) -> str:
        position = self.prompt_source.state_dict()
        return f"prompts stream<={position['stream_id']} file epoch {position['epoch']} index {position['index']}"

    def _register_start_version(self) -> None:
        """Registers (with a snapshot) the version the learner starts from, so it can be rolled back to."""
        if self._registered or self.publisher is None:
            return
        version = self.status_.policy_version
        if self.publisher.registry.get(version) is None:
            self.publisher.register(PolicyEntry(version, step=self.status_.step, data_window=self._data_window(),
                                                reason="initial" if version == 0 else "resumed"),
                                    self.model.policy.state_dict())
        self._registered = True

    def promote_policy(self, version: int) -> PolicyEntry:
        """Marks ``version`` known-good (the default rollback target); UnknownVersion / NotRestorable."""
        if self.publisher is None:
            raise RuntimeError("the learner has no policy registry yet")
        return self.publisher.registry.promote(version)

    def rollback_target(self) -> int:
        """The default rollback target: the promoted version, else the current version's parent."""
        assert self.publisher is not None
        registry, current = self.publisher.registry, self.status_.policy_version
        promoted = registry.promoted_version()
        if promoted is not None and promoted != current:
            return promoted
        entry = registry.get(current)
        if entry is None or entry.parent_version < 0:
            raise UnknownVersion(f"version {current} has no registered parent to roll back to; pass a version")
        return entry.parent_version

    def rollback_policy(self, version: int | None = None, reason: str = "manual") -> tuple[int, int]:
        """Restores registered ``version`` (None = ``rollback_target()``) bit for bit and pushes it to every
        generator as a new, higher version. Returns (new version, restored version).

        The policy weights come from the version's snapshot; the optimizer's moments are reset (they
        belong to the abandoned trajectory and would push the weights back along it); the value
        head / critic, KL controller and LR schedule are kept (a baseline, not the behaviour being
        undone). Prefetched async samples are discarded. If no replica accepts the push nothing
        changes (RuntimeError).
        """
        if self.publisher is None:
            raise RuntimeError("the learner has no publisher yet")
        from flywheel.learner.targets import resolve_targets

        registry = self.publisher.registry
        with self._lock:
            self.wait_for_push()  # the rollback's version must land after the one in flight
            target = version if version is not None else self.rollback_target()
            state = registry.load_snapshot(target)  # UnknownVersion / NotRestorable
            parent = self.status_.policy_version
            new_version = max(parent, registry.current_version()) + 1
            report = self.publisher.push(state, new_version, resolve_targets(self.config.generator_targets),
                                         {"step": str(self.status_.step), "reason": f"rollback to {target}"})
            self.metrics.push_bytes.inc(report.bytes_sent)
            self.metrics.push_failures.inc(len(report.failed))
            if not report.ok:
                self.publisher.base, self.publisher.base_version = None, -1
                raise RuntimeError(f"rollback to version {target}: no generator accepted the push ({report.failed})")
            self.model.policy.load_state_dict(state)
            self.trainer.optimizer.state.clear()
            if self.async_rollouts is not None:
                self.async_rollouts.discard()
            self._set_version(new_version)
            restored = registry.get(target)
            self.publisher.register(PolicyEntry(
                new_version, parent_version=parent, step=self.status_.step,
                reward_model_version=restored.reward_model_version if restored else 0,
                data_window=self._data_window(), metrics=dict(restored.metrics) if restored else {},
                restored_from=target, reason=f"rollback:{reason}",
            ), state)
            self.metrics.rollbacks.labels(reason).inc()
        log.warning("rolled back to version %d (%s): serving it as version %d", target, reason, new_version)
        return new_version, target

    def _check_guard(self, metrics: dict[str, float]) -> None:
        """After a push: evaluate the served version; roll back when it violates a configured bound."""
        cfg = self.config
        if not cfg.guard_enabled or self.publisher is None or self.rollouts is None:
            return
        self._report_push(metrics)  # async mode: the version to evaluate must be serving
        registry, version = self.publisher.registry, self.status_.policy_version
        pad_id = self.tokenizer.pad_token_id  # type: ignore[attr-defined]
        evaluation = evaluate_served_policy(self.rollouts, self.reference, eval_prompts(cfg), cfg,
                                            pad_id if pad_id is not None else 0)
        metrics.update(eval_reward=evaluation.reward, eval_kl=evaluation.kl)
        registry.update_metrics(version, {"eval_reward": evaluation.reward, "eval_kl": evaluation.kl})
        promoted = registry.promoted_version()
        promoted_entry = registry.get(promoted) if promoted is not None and promoted != version else None
        reason = guard_violation(cfg, evaluation, promoted_entry.metrics.get("eval_reward") if promoted_entry else None)
        if reason is None:
            return
        log.warning("guard: version %d violates %s (eval reward %.4f, KL %.4f): rolling back", version, reason,
                    evaluation.reward, evaluation.kl)
        try:
            _new_version, restored = self.rollback_policy(None, reason)
        except Exception as exc:  # the step itself succeeded; the guard reports and tries again next step
            log.error("guard: rollback after %s failed: %s", reason, exc)
            metrics["guard_rollback_failed"] = 1.0
            return
        metrics.update(guard_rollback_from=float(version), guard_rollback_to=float(restored))
