"""What `flywheel demo` and `flywheel up --demo` run: build the config, run the demo, print the result,
and turn the outcome into an exit code (0 learned, 1 the loop failed, 2 bad arguments)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flywheel.cluster import ClusterError
from flywheel.demo.preferences import PreferenceError
from flywheel.demo.run import DEFAULT_RUN_ROOT, Demo, DemoConfig, DemoError


def run_demo_command(console: Console, preference: str = "positive_sentiment", minutes: float | None = None,
                     steps: int | None = None, run_dir: Path | None = None, base_port: int | None = 0,
                     quick: bool = False, run_root: Path | None = None) -> int:
    """Runs the demo; returns the exit code. Errors are printed, not raised."""
    root = (run_root or DEFAULT_RUN_ROOT).expanduser()
    changes: dict[str, Any] = {k: v for k, v in (("minutes", minutes), ("steps", steps)) if v is not None}
    changes.update(preference=preference, base_port=base_port,
                   run_dir=run_dir or root / time.strftime("%Y%m%d-%H%M%S"))
    try:
        cfg = DemoConfig.quick(**changes) if quick else DemoConfig(**changes)
        demo = Demo(cfg, console)
    except (PreferenceError, ValueError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        return 2

    def on_sigterm(*_: object) -> None:
        raise KeyboardInterrupt  # unwinds through Demo.run's cleanup, like Ctrl-C

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        summary = demo.run()
    except (DemoError, ClusterError) as exc:
        console.print(f"[red]error:[/red] the demo failed: {escape(str(exc))}", soft_wrap=True)
        console.print(f"logs: {demo.run_dir / 'cluster' / 'logs'}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted; everything is stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_summary(console, summary)
    if not summary["ok"]:
        console.print("[red]the loop did not do its job:[/red] " + escape("; ".join(summary["problems"])), soft_wrap=True)
        return 1
    return 0


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    before, after = summary["before"], summary["after"]
    rm = summary["reward_model"]
    table = Table(title=f"Flywheel demo — hidden preference: {summary['preference']}")
    table.add_column("")
    table.add_column("value")
    table.add_row(f"preference on {summary['heldout_prompts']} fresh prompts",
                  f"{before['score']:+.3f} (v{before['policy_version']}) → {after['score']:+.3f} "
                  f"(v{after['policy_version']})   Δ {summary['improvement']:+.3f}")
    table.add_row("PPO steps / policy versions", f"{summary['steps']} / {summary['policy_versions']}")
    accuracy = rm["heldout_accuracy"]
    table.add_row("reward model versions / held-out accuracy",
                  f"{rm['versions']} / {'-' if accuracy is None else format(accuracy, '.2f')}")
    table.add_row("feedback stored", ", ".join(f"{k} {v}" for k, v in summary["feedback"]["stored_by_kind"].items()))
    table.add_row("wall time", f"{summary['wall_seconds']:.0f}s (training {summary['training_seconds']:.0f}s)")
    console.print(table)
    for label, result in (("before", before), ("after", after)):
        examples = "; ".join(f"{escape(str(e['prompt']))} [bold]{escape(str(e['completion']))}[/bold]" for e in result["examples"][:3])
        console.print(f"{label}: {examples}")
    console.print(f"summary: {summary['run_dir']}/summary.json   curves: {', '.join(summary['curves'])}")
