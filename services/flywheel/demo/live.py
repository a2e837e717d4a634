"""The demo's live view: what each part of the loop reports, polled over gRPC (learner GetStatus,
feedback GetFeedbackStats, reward GetModel), plus the simulated users' own tally."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from flywheel.demo.report import read_rm_fits
from flywheel.demo.users import UserStats
from flywheel.v1 import (
    feedback_pb2,
    feedback_pb2_grpc,
    learner_pb2,
    learner_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)

RPC_TIMEOUT_S = 5.0


@dataclass
class Snapshot:
    """One poll of the cluster."""

    elapsed_s: float = 0.0
    step: int = 0
    policy_version: int = 0
    phase: str = "-"
    waiting_reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    learner_rm_version: int = 0
    reward_service_version: int = 0
    feedback_by_kind: dict[str, int] = field(default_factory=dict)
    consumer_lag: int = 0
    rm_fits: int = 0
    rm_accuracy: float | None = None
    errors: list[str] = field(default_factory=list)


class ClusterPoller:
    """Reads the status RPCs with the cluster's internal token."""

    def __init__(self, addresses: dict[str, str], token: str, learner_run_dir: Path | None = None) -> None:
        self.learner_run_dir = learner_run_dir
        self.metadata = [("authorization", f"Bearer {token}")]
        self.channels = {name: grpc.insecure_channel(address) for name, address in addresses.items()}
        self.learner = learner_pb2_grpc.LearnerServiceStub(self.channels["learner"])
        self.feedback = feedback_pb2_grpc.FeedbackServiceStub(self.channels["feedback"])
        self.reward = reward_pb2_grpc.RewardServiceStub(self.channels["reward"])
        self.started = time.monotonic()

    def poll(self) -> Snapshot:
        snap = Snapshot(elapsed_s=time.monotonic() - self.started)
        try:
            status = self.learner.GetStatus(learner_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT_S,
                                            metadata=self.metadata).status
            snap.step, snap.policy_version = int(status.step), int(status.policy_version)
            snap.phase = learner_pb2.LearnerPhase.Name(status.phase).removeprefix("LEARNER_PHASE_").lower()
            snap.waiting_reason = status.waiting_reason
            snap.metrics = dict(status.last_metrics)
            snap.learner_rm_version = int(status.reward_model_version)
        except grpc.RpcError as exc:
            snap.errors.append(f"learner: {exc.code().name}")  # type: ignore[attr-defined]
        try:
            stats = self.feedback.GetFeedbackStats(feedback_pb2.GetFeedbackStatsRequest(), timeout=RPC_TIMEOUT_S,
                                                   metadata=self.metadata)
            snap.feedback_by_kind = dict(stats.accepted_by_kind)
            snap.consumer_lag = int(stats.consumer_lag)
        except grpc.RpcError as exc:
            snap.errors.append(f"feedback: {exc.code().name}")  # type: ignore[attr-defined]
        try:
            model = self.reward.GetModel(reward_pb2.GetModelRequest(), timeout=RPC_TIMEOUT_S, metadata=self.metadata)
            snap.reward_service_version = int(model.model_version)
        except grpc.RpcError as exc:
            snap.errors.append(f"reward: {exc.code().name}")  # type: ignore[attr-defined]
        if self.learner_run_dir is not None:  # fits are logged to metrics.jsonl, not GetStatus
            fits = read_rm_fits(self.learner_run_dir)
            snap.rm_fits = len(fits)
            accuracies = [f["heldout_accuracy"] for f in fits if f["heldout_accuracy"] is not None]
            snap.rm_accuracy = accuracies[-1] if accuracies else None
        return snap

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


def _fmt(value: float | None, spec: str = "+.3f") -> str:
    return "-" if value is None else format(value, spec)


def _table(title: str) -> Table:
    table = Table(title=title, show_header=False, title_style="bold")
    table.add_column(no_wrap=True, style="dim")
    table.add_column(no_wrap=True)
    return table


def render(snap: Snapshot, users: UserStats, preference: str, evals: list[tuple[int, float]],
           budget: str) -> Group:
    """The live view: the learner on the left, the users and their feedback on the right."""
    m = snap.metrics
    loop = _table("learner")
    loop.add_row("step", f"{snap.step} {budget}")
    loop.add_row("policy version", str(snap.policy_version))
    loop.add_row("phase", snap.phase + (f" ({snap.waiting_reason[:30]})" if snap.waiting_reason else ""))
    loop.add_row("reward (RM, mean)", _fmt(m.get("reward_mean")))
    loop.add_row("KL to reference", _fmt(m.get("kl"), ".4f"))
    loop.add_row("RM version", f"{snap.reward_service_version} (learner {snap.learner_rm_version})")
    loop.add_row("RM held-out accuracy", f"{_fmt(snap.rm_accuracy, '.2f')} after {snap.rm_fits} fits")

    fb = _table(f"users (hidden preference: {preference})")
    with users.lock:
        fb.add_row("generations", str(users.generations))
        fb.add_row("comparisons (ties)", f"{users.comparisons} ({users.ties})")
        fb.add_row("thumbs up / down", f"{users.thumbs_up} / {users.thumbs_down}")
        if users.errors:
            fb.add_row("[red]errors[/red]", escape(f"{users.errors}: {users.last_error[:40]}"))
        recent = list(users.recent_scores)
    stored = ", ".join(f"{k} {v}" for k, v in sorted(snap.feedback_by_kind.items()) if v) or "-"
    fb.add_row("stored feedback", stored)
    fb.add_row("not yet consumed", str(snap.consumer_lag))
    if recent:
        fb.add_row("their score, recent", f"{sum(recent) / len(recent):+.3f} (last {len(recent)} answers)")
    if evals:
        (v0, first), (v1, last) = evals[0], evals[-1]
        fb.add_row("fresh prompts", f"{first:+.3f} (v{v0}) → {last:+.3f} (v{v1})")

    grid = Table.grid(padding=(0, 2))
    grid.add_row(loop, fb)
    unreachable = f"   unreachable: {', '.join(snap.errors)}" if snap.errors else ""
    return Group(grid, Text(f"elapsed {snap.elapsed_s:.0f}s{unreachable}", style="dim"))


def step_line(snap: Snapshot) -> str:
    """One plain line per learner step, for logs and non-terminal output."""
    m = snap.metrics
    stored = snap.feedback_by_kind
    return (f"[{snap.elapsed_s:5.0f}s] step {snap.step} v{snap.policy_version} reward {_fmt(m.get('reward_mean'))} "
            f"kl {_fmt(m.get('kl'), '.4f')} rm v{snap.reward_service_version} acc {_fmt(snap.rm_accuracy, '.2f')} "
            f"comparisons {stored.get('comparison', 0)} ratings {stored.get('rating', 0)}")
