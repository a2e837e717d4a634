"""`flywheel demo`: the whole online-RLHF loop on one machine, driven by simulated users.

1. prepare the demo models (cached): an SFT-ed tiny policy, and a reward model that knows nothing
   of the users' preference;
2. start the local cluster (embedded Redis + four services) with the learner learning from feedback
   and the reward service scoring with the reward model only;
3. simulated users generate, compare by their hidden preference and send thumbs; once there is some
   feedback the learner starts: it fits the reward model on the feedback, pushes it to the reward
   service, runs PPO and pushes each new policy version to the generator;
4. the users' preference score on fresh held-out prompts is measured before, during and after;
5. summary.json and curves go to the run directory, and everything is stopped.

The hidden preference never leaves this process: the services only ever see the users' feedback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.live import Live

from flywheel.cluster import ClusterState, LocalCluster, pid_alive
from flywheel.demo.evaluation import Evaluation, PromptSplit, evaluate, split_prompts
from flywheel.demo.live import ClusterPoller, Snapshot, render, step_line
from flywheel.demo.models import demo_policy, demo_reward_model
from flywheel.demo.preferences import Preference, load_preference
from flywheel.demo.report import plot_demo, read_rm_fits, write_summary
from flywheel.demo.users import SimulatedUsers, UserSettings
from flywheel.learner.config import LearnerConfig
from flywheel.v1 import learner_pb2, learner_pb2_grpc
from flywheel_client import ClientConfig, FlywheelClient

DEFAULT_RUN_ROOT = Path("~/.local/share/flywheel/demo").expanduser()
SETTLED_PHASES = ("idle", "paused")
POLL_S = 0.5
FEEDBACK_WAIT_S = 90.0  # 96 comparisons take ~10 s; far longer means the users see only ties


class DemoError(RuntimeError):
    """The demo could not run, or the loop did not do its job; the message says which part."""


@dataclass(frozen=True)
class DemoConfig:
    """One demo run. ``quick()`` gives the short variant the tests use."""

    preference: str = "positive_sentiment"
    """The users' hidden preference: a built-in name or module:function (text -> score)."""
    minutes: float = 6.0
    """Training budget in minutes (from the learner's first step); setup and evaluation come on top."""
    steps: int = 100
    """Stop after this many PPO steps (whichever of minutes/steps comes first)."""
    run_dir: Path | None = None
    """Where summary.json, curves, logs and the cluster's data go (default: a new timestamped dir)."""
    base_port: int | None = 0
    """First gRPC port of the cluster (0 = any free ports, None = the services' default ports)."""
    seed: int = 0
    """Seeds the prompt split, the users, the learner and the evaluation."""
    users: UserSettings = field(default_factory=UserSettings)
    """How the simulated users behave."""
    min_comparisons: int = 96
    """Comparisons stored before the learner starts (its first reward-model fit needs data)."""
    eval_samples: int = 4
    """Answers per held-out prompt in each evaluation."""
    eval_every: int = 10
    """Evaluate on the held-out prompts every this many policy versions (0 = only before/after)."""
    learner: dict[str, str] = field(default_factory=dict)
    """Extra learner settings (FIELD -> value) over the demo's defaults."""

    @classmethod
    def quick(cls, **changes: Any) -> DemoConfig:
        """A couple of minutes: fewer steps, no evaluations in between."""
        return cls(**{"minutes": 3.0, "steps": 36, "eval_every": 0, **changes})


def learner_settings(cfg: DemoConfig, policy: Path, reward_model: Path, prompts_file: Path,
                     run_dir: Path) -> dict[str, str]:
    """The learner's fields for the demo: small fast PPO steps (bench/ppo_learning.py's recipe) and
    feedback learning that warm-starts from the reward service's model, fitting every other step."""
    settings = {
        "policy_model": str(policy), "prompts_file": str(prompts_file), "run_dir": str(run_dir / "learner"),
        "checkpoint_dir": str(run_dir / "checkpoints"), "autostart": "false", "total_steps": str(cfg.steps), "seed": str(cfg.seed),
        "prompts_per_step": "8", "samples_per_prompt": "2", "minibatch_size": "8", "ppo_epochs": "2",
        "max_new_tokens": str(cfg.users.max_new_tokens), "learning_rate": "3e-4", "checkpoint_every": "0",
        # The RM's scale drifts with every fit: an adaptive KL coefficient holds KL near the target
        # whatever the scale, so the policy keeps writing sentences instead of "lovely lovely lovely".
        "init_kl_coef": "0.1", "target_kl": "4", "kl_horizon": "200",
        "feedback_learning": "true", "reward_model": str(reward_model), "rm_fit_every_steps": "2",
        "rm_min_new_events": "48", "rm_learning_rate": "1e-3",
        "rm_max_steps": "30", "rm_batch_size": "16", "feedback_batch": "192", "sft_on_corrections": "false",
        **cfg.learner,
    }
    # The demo's own defaults are checked too: one that no longer names a field fails loudly here.
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(LearnerConfig)})
    if unknown:
        raise DemoError(f"unknown learner settings {unknown}: see flywheel/learner/config.py for the fields")
    return settings


def cluster_env(learner: dict[str, str], policy: Path, reward_model: Path) -> dict[str, str]:
    env = {f"FLYWHEEL_LEARNER_{k.upper()}": v for k, v in learner.items()}
    env.update({
        "FLYWHEEL_GENERATOR_MODEL": str(policy),
        "FLYWHEEL_REWARD_MODEL": str(reward_model),  # the RM alone: no rule sees the preference
        "FLYWHEEL_REWARD_TORCH_THREADS": "1",
        # Four processes share the cores: intra-op threads that wait on each other only lose.
        "OMP_NUM_THREADS": "1",
    })
    return env


def _record_processes(run_dir: Path, state: ClusterState) -> None:
    """processes.json: every child the demo started, so anyone can check none is left behind."""
    pids = {name: svc.pid for name, svc in state.services.items()}
    pids["redis"] = state.redis_pid
    (run_dir / "processes.json").write_text(json.dumps({"demo_pid": os.getpid(), "children": pids}, indent=2))


class Demo:
    """One run: owns the cluster, the users and the live view; ``run()`` returns the summary."""

    def __init__(self, cfg: DemoConfig, console: Console | None = None) -> None:
        self.cfg = cfg
        self.console = console or Console()
        self.preference: Preference = load_preference(cfg.preference)  # PreferenceError: bad --preference
        self.run_dir = (cfg.run_dir or DEFAULT_RUN_ROOT / time.strftime("%Y%m%d-%H%M%S")).expanduser().resolve()
        self.split: PromptSplit = split_prompts(cfg.seed)
        self.evals: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.cluster: LocalCluster | None = None
        self.users: SimulatedUsers | None = None
        self.poller: ClusterPoller | None = None
        self.started = time.monotonic()
        self.training_started = 0.0
        self.snapshot = Snapshot()

    # --- setup ---------------------------------------------------------------------------------
    def start(self) -> ClusterState:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._stage(f"run directory {self.run_dir}")
        with self.console.status("preparing the demo models (SFT of tiny://llama, cached after the first run)..."):
            policy, reward_model = demo_policy(), demo_reward_model()
        prompts_file = self.split.write_train_jsonl(self.run_dir / "prompts.jsonl")
        learner = learner_settings(self.cfg, policy, reward_model, prompts_file, self.run_dir)
        self.cluster = LocalCluster(self.run_dir / "cluster", base_port=self.cfg.base_port,
                                    env=cluster_env(learner, policy, reward_model))
        with self.console.status("starting embedded Redis and the four services..."):
            state = self.cluster.start()
        self._stage(f"cluster up: logs in {self.run_dir / 'cluster' / 'logs'}; "
                    f"`flywheel status --data-dir {self.run_dir / 'cluster'}` from another terminal")
        _record_processes(self.run_dir, state)
        addresses = {name: svc.address for name, svc in state.services.items()}
        self.poller = ClusterPoller(addresses, state.internal_token, self.run_dir / "learner")
        self.client_config = ClientConfig(generator_address=addresses["generator"],
                                          feedback_address=addresses["feedback"], api_key=state.api_key,
                                          timeout_s=60.0)
        self.learner_channel = grpc.insecure_channel(addresses["learner"])
        self.learner_stub = learner_pb2_grpc.LearnerServiceStub(self.learner_channel)
        self.internal = [("authorization", f"Bearer {state.internal_token}")]
        return state

    def evaluate(self, label: str) -> Evaluation:
        with FlywheelClient(self.client_config) as client:
            result = evaluate(client, self.split.heldout, self.preference, self.cfg.eval_samples,
                              self.cfg.users.max_new_tokens, seed=4242 + self.cfg.seed)
        self.evals.append({"label": label, "step": self.snapshot.step, "policy_version": result.policy_version,
                           "score": result.score, "count": result.count})
        return result

    # --- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Runs the demo; always stops what it started. Returns the summary (also in summary.json)."""
        try:
            self.start()
            assert self.poller is not None
            self.users = SimulatedUsers(self.client_config, self.preference, self.split.train, self.cfg.users)
            self.users.start()
            before = self.evaluate("before")
            self._stage(f"before training: {self.preference.name} {before.score:+.3f} on "
                        f"{len(self.split.heldout)} fresh prompts")
            self._wait_for_feedback()
            self.learner_stub.Resume(learner_pb2.ResumeRequest(), timeout=10, metadata=self.internal)
            self.training_started = time.monotonic()
            self._train()
            self._settle()
            self.users.stop()
            after = self.evaluate("after")
            return self._finish(before, after)
        finally:
            self.close()

    def _check_alive(self) -> None:
        assert self.cluster is not None
        for name, proc in self.cluster.procs.items():
            if proc.poll() is not None:
                log_file = self.run_dir / "cluster" / "logs" / f"{name}.log"
                raise DemoError(f"the {name} service exited (code {proc.returncode}); see {log_file}")
        if self.users is not None and self.users.fatal is not None:
            raise DemoError(f"the simulated users stopped: {self.users.fatal}")

    def _wait_for_feedback(self) -> None:
        """Until the feedback service holds min_comparisons comparisons (the first RM fit needs data)."""
        assert self.poller is not None and self.users is not None
        want = self.cfg.min_comparisons
        self._stage(f"users are giving feedback; the learner starts after {want} comparisons")
        deadline = time.monotonic() + FEEDBACK_WAIT_S
        with self.console.status("") as status:
            while True:
                self._check_alive()
                self.snapshot = self.poller.poll()
                have = self.snapshot.feedback_by_kind.get("comparison", 0)
                status.update(f"users are giving feedback: {have}/{want} comparisons before the learner starts...")
                if have >= want:
                    return
                if time.monotonic() > deadline:
                    raise DemoError(self._too_little_feedback(have))
                time.sleep(POLL_S)  # polling the cluster's status RPCs

    def _too_little_feedback(self, have: int) -> str:
        assert self.users is not None
        stats = self.users.stats
        why = (f"the users asked {stats.generations} times and could not tell the answers apart "
               f"{stats.ties} times by {self.preference.name!r}: this preference may not distinguish anything "
               "the demo model writes" if stats.ties else f"the users asked {stats.generations} times")
        errors = f"; {stats.errors} user errors, the last: {stats.last_error}" if stats.errors else ""
        return f"only {have} of {self.cfg.min_comparisons} comparisons after {FEEDBACK_WAIT_S:.0f}s: {why}{errors}"

    def _stage(self, message: str) -> None:
        self.console.print(f"[dim]{time.monotonic() - self.started:5.0f}s[/dim] {message}", soft_wrap=True)

    def _budget_left(self) -> float:
        return self.cfg.minutes * 60 - (time.monotonic() - self.training_started)

    def _train(self) -> None:
        """Polls the cluster and refreshes the live view until the step or time budget is spent."""
        assert self.poller is not None and self.users is not None
        interactive = self.console.is_terminal
        last_step, last_eval_version = -1, 0
        with Live(console=self.console, refresh_per_second=4, transient=False) if interactive \
                else _NoLive() as live:
            while True:
                self._check_alive()
                self.snapshot = snap = self.poller.poll()
                if snap.step != last_step:
                    last_step = snap.step
                    if not interactive:
                        self.console.print(step_line(snap), highlight=False, soft_wrap=True)
                    every = self.cfg.eval_every
                    if every and snap.policy_version - last_eval_version >= every:
                        last_eval_version = snap.policy_version
                        self.evaluate(f"step {snap.step}")
                live.update(self._view())
                if snap.step >= self.cfg.steps or self._budget_left() <= 0:
                    return
                time.sleep(POLL_S)  # polling the cluster's status RPCs

    def _view(self) -> Any:
        assert self.users is not None
        left = max(0.0, self._budget_left())
        budget = f"/ {self.cfg.steps} · {left / 60:.1f} min left"
        evals = [(int(e["policy_version"]), float(e["score"])) for e in self.evals]
        return render(self.snapshot, self.users.stats, self.preference.name, evals, budget)

    def _settle(self, timeout: float = 180.0) -> None:
        """Pauses the learner (if the step budget did not stop it) and waits for its last push."""
        assert self.poller is not None
        if self.snapshot.step < self.cfg.steps:
            self.learner_stub.Pause(learner_pb2.PauseRequest(reason="demo budget spent"), timeout=10,
                                    metadata=self.internal)
        deadline = time.monotonic() + timeout
        with self.console.status("waiting for the learner's last step and push..."):
            while True:
                self._check_alive()
                self.snapshot = self.poller.poll()
                if self.snapshot.phase in SETTLED_PHASES:
                    return
                if time.monotonic() > deadline:
                    raise DemoError(f"the learner did not settle within {timeout:.0f}s "
                                    f"(phase {self.snapshot.phase})")
                time.sleep(POLL_S)  # polling the cluster's status RPCs

    # --- results -------------------------------------------------------------------------------
    def _finish(self, before: Evaluation, after: Evaluation) -> dict[str, Any]:
        assert self.users is not None
        snap, stats = self.snapshot, self.users.stats
        learner_run_dir = self.run_dir / "learner"
        fits = read_rm_fits(learner_run_dir)
        accuracy = [(f["step"], f["heldout_accuracy"]) for f in fits if f["heldout_accuracy"] is not None]
        summary: dict[str, Any] = {
            "preference": self.preference.name,
            "heldout_prompts": len(self.split.heldout),
            "before": dataclasses.asdict(before),
            "after": dataclasses.asdict(after),
            "improvement": after.score - before.score,
            "steps": snap.step,
            "policy_versions": snap.policy_version,
            "reward_model": {
                "versions": snap.reward_service_version,
                "learner_version": snap.learner_rm_version,
                "heldout_accuracy": accuracy[-1][1] if accuracy else None,
                "fits": len(fits),
                "fits_pushed": sum(f["pushed"] for f in fits),
                "heldout_accuracy_by_step": accuracy,
            },
            "feedback": {
                "stored_by_kind": snap.feedback_by_kind,
                "users": {k: getattr(stats, k) for k in ("generations", "comparisons", "ties", "thumbs_up",
                                                          "thumbs_down", "errors")},
            },
            "users_score_by_policy_version": {str(v): m for v, m in stats.mean_score_by_version().items()},
            "evaluations": self.evals,
            "training_seconds": time.monotonic() - self.training_started,
            "run_dir": str(self.run_dir),
        }
        summary["curves"] = self._plots(learner_run_dir, stats)
        summary["problems"] = self.problems + _problems(summary)
        summary["ok"] = not summary["problems"]
        summary["wall_seconds"] = time.monotonic() - self.started
        write_summary(self.run_dir, summary)
        return summary

    def _plots(self, learner_run_dir: Path, stats: Any) -> list[str]:
        from flywheel.learner.plot import plot_run

        paths = []
        try:
            paths.append(str(plot_run(learner_run_dir, self.run_dir / "curves.png")))
        except (FileNotFoundError, ValueError) as exc:
            self.problems.append(f"no learner curves: {exc}")
        paths.append(str(plot_demo(self.run_dir, learner_run_dir, self.preference.name,
                                   stats.mean_score_by_version(), self.evals)))
        return paths

    def close(self) -> None:
        """Stops users, then services and Redis; checks that no child outlived the stop. Idempotent."""
        if self.users is not None:
            self.users.stop()
        if self.poller is not None:
            self.poller.close()
            self.learner_channel.close()
            self.poller = None
        if self.cluster is not None:
            pids = [p.pid for p in self.cluster.procs.values()]
            redis = self.cluster.redis.process.pid if self.cluster.redis and self.cluster.redis.process else 0
            self.cluster.stop()
            self.cluster = None
            alive = [pid for pid in [*pids, redis] if pid_alive(pid)]
            if alive:
                raise DemoError(f"processes {alive} outlived the cluster stop")


class _NoLive:
    """Stands in for rich.live.Live when the output is not a terminal (one line per step instead)."""

    def __enter__(self) -> _NoLive:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def update(self, _renderable: Any) -> None:
        return None


def _problems(summary: dict[str, Any]) -> list[str]:
    """Why the loop did not do its job, if it did not (empty = success)."""
    problems = []
    if summary["steps"] < 1:
        problems.append("the learner made no PPO step")
    if summary["policy_versions"] < 2:
        problems.append(f"the generator got {summary['policy_versions']} new policy versions (want >= 2)")
    if summary["reward_model"]["versions"] < 1:
        problems.append("no reward model learned from feedback was pushed to the reward service")
    if summary["improvement"] <= 0:
        problems.append(f"the users' preference score on fresh prompts did not improve "
                        f"({summary['before']['score']:+.3f} -> {summary['after']['score']:+.3f})")
    return problems
