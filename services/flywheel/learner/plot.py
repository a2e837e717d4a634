"""Curves of a run from run_dir/metrics.jsonl: reward, KL, entropy and step time, to one PNG."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (
    ("reward_mean", "reward (mean)"),
    ("kl", "KL to reference (per sequence)"),
    ("entropy", "entropy (per token)"),
    ("seconds_total", "step time (s)"),
)


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    path = Path(run_dir).expanduser() / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: point at a learner run_dir that has trained steps")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draws the run's curves (matplotlib, Agg backend) and returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no steps yet")
    target = Path(out) if out else Path(run_dir).expanduser() / "curves.png"
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
        if key == "seconds_total":
            for phase in ("generate", "score", "train", "push"):
                parts = [(r["step"], r[f"seconds_{phase}"]) for r in records if f"seconds_{phase}" in r]
                if parts:
                    ax.plot(*zip(*parts, strict=True), label=phase, linewidth=1)
        if points:
            ax.plot(*zip(*points, strict=True), label="total" if key == "seconds_total" else key, color="black")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key == "seconds_total":
            ax.legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
