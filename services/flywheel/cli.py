"""The `flywheel` command: serve one service, run the local cluster, check its status."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from flywheel.common.config import ConfigError, load_config
from flywheel.feedback.cli import feedback_app
from flywheel.learner.control_cli import learner_app
from flywheel.learner.policy_cli import policy_app
from flywheel.services import SERVICES
from flywheel.training.cli import train_app

app = typer.Typer(
    help="Flywheel: online RLHF as a gRPC microservice cluster.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="API keys for the public surface.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(feedback_app, name="feedback")
app.add_typer(policy_app, name="policy")
app.add_typer(learner_app, name="learner")
app.add_typer(train_app, name="train")
console = Console(stderr=True)
out = Console()

DEFAULT_DATA_DIR = Path("~/.local/share/flywheel").expanduser()


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help="generator, reward, feedback or learner")],
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file")] = None,  # noqa: UP045
    host: Annotated[Optional[str], typer.Option(help="Bind address (overrides config)")] = None,  # noqa: UP045
    port: Annotated[Optional[int], typer.Option(help="gRPC port (overrides config)")] = None,  # noqa: UP045
) -> None:
    """Run one service in the foreground until SIGTERM/Ctrl-C (then drain and exit 0)."""
    from flywheel.common.logs import setup_logging

    spec = SERVICES.get(service)
    if spec is None:
        raise _fail(f"unknown service {service!r}: choose one of {', '.join(SERVICES)}")
    try:
        cfg = load_config(spec.config_class(), service, config, overrides={"host": host, "port": port})
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    setup_logging(cfg.log_level, cfg.log_format, service)
    try:
        spec.serve_function()(cfg)
    except ConfigError as exc:
        raise _fail(str(exc)) from exc


@app.command()
def up(
    data_dir: Annotated[
        Path, typer.Option(help="Redis data, logs, checkpoints and cluster.json")
    ] = DEFAULT_DATA_DIR,
    base_port: Annotated[Optional[int], typer.Option(help="First gRPC port (0 = any free ports)")] = None,  # noqa: UP045
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every service to be healthy")] = 300.0,
    detach_check: Annotated[
        bool, typer.Option("--check", help="Start, print the status, stop (smoke test)")
    ] = False,
    demo_mode: Annotated[
        bool, typer.Option("--demo", help="Run the demo (`flywheel demo`) instead of waiting idle")
    ] = False,
) -> None:
    """Start the local cluster: embedded Redis + the four services on a tiny model. Ctrl-C stops everything."""
    if demo_mode:
        from flywheel.demo.cli import run_demo_command

        raise typer.Exit(run_demo_command(out, base_port=base_port, run_root=data_dir / "demo"))
    from flywheel.cluster import ClusterError, LocalCluster

    cluster = LocalCluster(data_dir, base_port=base_port)
    with console.status("starting embedded Redis and four services (first run builds the tiny models)..."):
        try:
            state = cluster.start(timeout=timeout)
        except ClusterError as exc:
            raise _fail(str(exc), 1) from exc
    table = Table(title="Flywheel local cluster", show_lines=False)
    for column in ("service", "gRPC", "metrics", "pid", "log"):
        table.add_column(column)
    for svc in state.services.values():
        table.add_row(
            svc.name,
            svc.address,
            f"http://{cluster.host}:{svc.metrics_port}/metrics",
            str(svc.pid),
            svc.log_file,
        )
    table.add_row("redis", state.redis_url, "", str(state.redis_pid), "")
    out.print(table)
    out.print(f"API key (send as 'authorization: Bearer <key>'): [bold]{state.api_key}[/bold]")
    out.print(f"State (with the internal token, mode 600): {cluster.state_path}")
    if detach_check:
        _print_status(state.services, state.api_key)
        cluster.stop()
        return
    out.print("[green]all services healthy[/green]; Ctrl-C to stop. Start training: `flywheel learner resume`")
    try:
        died = cluster.wait()
    finally:
        with console.status("stopping services and Redis..."):
            cluster.stop()
    if died:
        log_file = state.services[died].log_file if died in state.services else ""
        raise _fail(f"{died} exited unexpectedly; see {log_file or 'its log'}", 1)
    out.print("stopped")


def _print_status(services: dict, api_key: str) -> bool:  # type: ignore[type-arg]
    from flywheel.status import collect_status

    rows = collect_status({name: svc.address for name, svc in services.items()}, api_key)
    table = Table(title="Flywheel status")
    for column in ("service", "address", "health", "detail"):
        table.add_column(column)
    for row in rows:
        colour = "green" if row.health == "SERVING" else "red"
        table.add_row(row.name, row.address, f"[{colour}]{row.health}[/{colour}]", row.detail)
    out.print(table)
    return all(row.health == "SERVING" for row in rows)


@app.command()
def status(
    data_dir: Annotated[Path, typer.Option(help="Data dir of a running `flywheel up`")] = DEFAULT_DATA_DIR,
    target: Annotated[
        list[str] | None, typer.Option(help="NAME=HOST:PORT, repeatable (instead of --data-dir)")
    ] = None,
    api_key: Annotated[str, typer.Option(envvar="FLYWHEEL_API_KEY", help="API key for detail RPCs")] = "",
) -> None:
    """Health and policy version of each service. Exit 1 if any is not SERVING."""
    from flywheel.cluster import STATE_FILE, ClusterState, ServiceProcess

    if target:
        services = {}
        for item in target:
            name, sep, address = item.partition("=")
            if not sep or name not in SERVICES or ":" not in address:
                raise _fail(f"--target {item!r}: expected NAME=HOST:PORT with NAME in {', '.join(SERVICES)}")
            services[name] = ServiceProcess(name, address, 0)
    else:
        state_path = data_dir.expanduser() / STATE_FILE
        if not state_path.exists():
            raise _fail(
                f"no running cluster found at {state_path}: start one with `flywheel up`, or pass --target", 1
            )
        state = ClusterState.load(state_path)
        services, api_key = state.services, api_key or state.api_key
    if not _print_status(services, api_key):
        raise typer.Exit(1)


@app.command()
def demo(
    preference: Annotated[
        str, typer.Option(help="The users' hidden preference: positive_sentiment, negative_sentiment, "
                          "short_answers, exclamations, mentions_food, or module:function (text -> score)")
    ] = "positive_sentiment",
    minutes: Annotated[Optional[float], typer.Option(help="Training budget in minutes (default 6; --quick 3)")] = None,  # noqa: UP045
    steps: Annotated[Optional[int], typer.Option(help="Most PPO steps (default 100; --quick 36)")] = None,  # noqa: UP045
    run_dir: Annotated[Optional[Path], typer.Option(help="Summary, curves and logs (default: a new dir under ~/.local/share/flywheel/demo)")] = None,  # noqa: UP045
    base_port: Annotated[int, typer.Option(help="First gRPC port (0 = any free ports)")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="A short run (a few minutes): fewer steps")] = False,
) -> None:
    """Simulated users judge answers by a hidden preference; the loop learns it. Exit 1 if it did not."""
    from flywheel.demo.cli import run_demo_command

    raise typer.Exit(run_demo_command(out, preference, minutes, steps, run_dir, base_port, quick))


@keys_app.command("new")
def keys_new(name: Annotated[str, typer.Argument(help="Client name, e.g. the app using the key")]) -> None:
    """Make an API key: prints the key (give it to the client) and the line for api_keys_file."""
    from flywheel.common.auth import hash_key, new_secret

    if not name or any(c.isspace() for c in name):
        raise _fail("NAME must be non-empty and contain no whitespace")
    key = new_secret()
    out.print(f"key:  {key}")
    out.print(f"line: {name} {hash_key(key)}")


@app.command()
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A learner run_dir (with metrics.jsonl)")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="PNG path (default RUN_DIR/curves.png)")] = None,  # noqa: UP045
) -> None:
    """Draw reward, KL, entropy and step-time curves of a learner run to a PNG."""
    from flywheel.learner.plot import plot_run

    try:
        path = plot_run(run_dir, output)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc), 1) from exc
    out.print(f"wrote {path}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
