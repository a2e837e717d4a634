"""What the demo leaves in its run directory: summary.json and the curves (learner curves.png from
``learner/plot.py``, and demo.png: the hidden preference, RM accuracy, RM reward and KL over time)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from flywheel.learner.plot import read_metrics


def read_rm_fits(learner_run_dir: Path) -> list[dict[str, Any]]:
    """The learner's reward-model fits from metrics.jsonl (its "event": "rm_fit" lines, see
    ``feedback_learning.fit_record``), each with the learner step it followed and a finite held-out
    accuracy or None."""
    try:
        records = read_metrics(learner_run_dir)
    except FileNotFoundError:
        return []
    fits, step = [], 0
    for record in records:
        if "step" in record:
            step = int(record["step"])
        if record.get("event") != "rm_fit":
            continue
        accuracy = record.get("heldout_accuracy")
        finite = isinstance(accuracy, (int, float)) and math.isfinite(accuracy)
        fits.append({"step": step, "heldout_accuracy": float(accuracy) if finite else None,  # type: ignore[arg-type]
                     "pushed": bool(record.get("pushed", True)), "rm_version": record.get("rm_version"),
                     "train_pairs": record.get("train_pairs"), "heldout_pairs": record.get("heldout_pairs")})
    return fits


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Writes run_dir/summary.json atomically."""
    path = run_dir / "summary.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def plot_demo(run_dir: Path, learner_run_dir: Path, preference: str,
              users_by_version: dict[int, tuple[float, int]], evals: list[dict[str, float]]) -> Path:
    """demo.png: the users' preference score (their traffic by policy version, and fresh held-out
    prompts), the reward model's held-out accuracy, and the RM reward and KL of each PPO step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        records = read_metrics(learner_run_dir)
    except FileNotFoundError:
        records = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    if users_by_version:
        versions = sorted(users_by_version)
        ax.plot(versions, [users_by_version[v][0] for v in versions], label="users' traffic", color="tab:blue")
    if evals:
        ax.plot([e["policy_version"] for e in evals], [e["score"] for e in evals], "o--", color="tab:red",
                label="fresh held-out prompts")
    ax.set_title(f"hidden preference: {preference}")
    ax.set_xlabel("policy version")
    ax.legend(fontsize=8)
    fits = [f for f in read_rm_fits(learner_run_dir) if f["heldout_accuracy"] is not None]
    for pushed, marker, label in ((True, "o", "pushed"), (False, "x", "not pushed (worse)")):
        chosen = [f for f in fits if f["pushed"] is pushed]
        if chosen:
            axes[1].plot([f["step"] for f in chosen], [f["heldout_accuracy"] for f in chosen], marker,
                         color="tab:green", label=label)
    axes[1].set_title("reward model: held-out pairwise accuracy")
    axes[1].set_xlabel("learner step")
    axes[1].set_ylim(0, 1.05)
    if fits:
        axes[1].legend(fontsize=8)
    _series(axes[2], records, "reward_mean", "RM reward (mean) and KL", "black", label="reward")
    twin = axes[2].twinx()
    _series(twin, records, "kl", None, "tab:orange", label="KL")
    twin.legend(fontsize=8, loc="lower right")
    axes[2].legend(fontsize=8, loc="upper left")
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    target = run_dir / "demo.png"
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def _series(ax: Any, records: list[dict[str, float]], key: str, title: str | None, color: str,
            label: str | None = None) -> None:
    points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
    if points:
        ax.plot(*zip(*points, strict=True), color=color, label=label or key)
    if title:
        ax.set_title(title)
        ax.set_xlabel("learner step")
