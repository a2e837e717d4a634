"""`flywheel feedback ...`: commands on the feedback stream (mounted by flywheel.cli)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

feedback_app = typer.Typer(help="Feedback stream: export training data.", no_args_is_help=True)
console = Console(stderr=True)

CLUSTER_STATE = Path("~/.local/share/flywheel/cluster.json")


def default_redis_url() -> str:
    """$FLYWHEEL_REDIS_URL, else the redis_url of the local `flywheel up` cluster, else ""."""
    url = os.environ.get("FLYWHEEL_REDIS_URL", "")
    if url:
        return url
    state = CLUSTER_STATE.expanduser()
    if state.is_file():
        try:
            return str(json.loads(state.read_text()).get("redis_url", ""))
        except (OSError, json.JSONDecodeError):
            return ""
    return ""


@feedback_app.command("export")
def export_command(
    kind: Annotated[
        str,
        typer.Option(
            help="sft (corrections), preference (comparisons + corrections; alias dpo, reward) or kto (ratings)"
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output file: .jsonl or .parquet")],
    redis_url: Annotated[
        str,
        typer.Option(help="Redis URL (default: $FLYWHEEL_REDIS_URL, else the local `flywheel up` cluster)"),
    ] = "",
) -> None:
    """Write the joined feedback in TRL's dataset format (reads the stream; the learner is not disturbed)."""
    from flywheel.common.redis_store import connect
    from flywheel.feedback.export import ExportError, check_output, export, resolve_kind

    try:
        resolve_kind(kind)
        check_output(out)
    except ExportError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    url = redis_url or default_redis_url()
    if not url:
        console.print(
            "[red]error:[/red] no Redis to read: pass --redis-url, set FLYWHEEL_REDIS_URL, or start `flywheel up`"
        )
        raise typer.Exit(2)
    try:
        client = connect(url)
        count = export(client, kind, out)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    except Exception as exc:  # redis errors: cannot connect, wrong type, ...
        console.print(f"[red]error:[/red] reading {url}: {exc}")
        raise typer.Exit(1) from exc
    console.print(f"wrote {count} {resolve_kind(kind)} rows to {out}")
