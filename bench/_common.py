"""Small helpers shared by the benches: argument parsing, the rich table, the final JSON line."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table


def parse(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smaller sizes: finishes in a couple of minutes")
    return parser.parse_args(argv)


def report(
    name: str, rows: list[tuple[str, str, str]], ours: float, baseline: float, target: float, unit: str,
    ratio: float | None = None,
) -> dict[str, object]:
    """Prints a table of (what, value, note) rows, then the JSON summary as the last stdout line."""
    table = Table(title=name)
    for column in ("measure", "value", "note"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    ratio = ratio if ratio is not None else (ours / baseline if baseline else float("inf"))
    summary = {"name": name, "ours": round(ours, 4), "baseline": round(baseline, 4),
               "ratio": round(ratio, 3), "target": target, "unit": unit}  # fmt: skip
    print(json.dumps(summary), flush=True)
    return summary


def terminate(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM (a server drains and exits), then SIGKILL if it is still there after ``timeout``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
