"""`flywheel learner status|pause|resume|checkpoint`: the learner's control RPCs from the shell.

Connection as for `flywheel policy` (``--learner HOST:PORT`` and ``--token``, else the local
`flywheel up` cluster). Exit codes: 0 done, 1 the learner refused or is unreachable, 2 bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from flywheel.learner.policy_cli import DEFAULT_DATA_DIR, DataDirOpt, LearnerOpt, TokenOpt, _call, _connection

learner_app = typer.Typer(help="Control the learner: status, pause, resume, checkpoint.", no_args_is_help=True)
out = Console()


def _show(s: Any) -> None:
    """Prints a LearnerStatus in one or two lines."""
    from flywheel.v1 import learner_pb2

    phase = learner_pb2.LearnerPhase.Name(s.phase).removeprefix("LEARNER_PHASE_").lower()
    line = f"step {s.step}, policy v{s.policy_version}, reward model v{s.reward_model_version}, {phase}"
    if s.paused and phase != "paused":
        line += ", pausing after this step"
    if s.waiting_reason:
        line += f" ({s.waiting_reason})"
    out.print(line)
    metrics = s.last_metrics
    if metrics:
        shown = ", ".join(f"{k}={metrics[k]:.4g}" for k in sorted(metrics)[:12])
        out.print(f"last step: {shown}")


@learner_app.command("status")
def status(learner: LearnerOpt = "", token: TokenOpt = "", data_dir: DataDirOpt = DEFAULT_DATA_DIR) -> None:
    """Step, versions, phase and the last step's metrics."""
    from flywheel.v1 import learner_pb2

    address, secret = _connection(learner, token, Path(data_dir))
    _show(_call(address, secret, "GetStatus", learner_pb2.GetStatusRequest()).status)


@learner_app.command("pause")
def pause(
    reason: str = typer.Option("", help="Why (logged by the learner)"),
    learner: LearnerOpt = "", token: TokenOpt = "", data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """Pause training after the current step."""
    from flywheel.v1 import learner_pb2

    address, secret = _connection(learner, token, Path(data_dir))
    _show(_call(address, secret, "Pause", learner_pb2.PauseRequest(reason=reason)).status)


@learner_app.command("resume")
def resume(learner: LearnerOpt = "", token: TokenOpt = "", data_dir: DataDirOpt = DEFAULT_DATA_DIR) -> None:
    """Start (or resume) training: generate → score → train → push, step after step."""
    from flywheel.v1 import learner_pb2

    address, secret = _connection(learner, token, Path(data_dir))
    _show(_call(address, secret, "Resume", learner_pb2.ResumeRequest()).status)


@learner_app.command("checkpoint")
def checkpoint(learner: LearnerOpt = "", token: TokenOpt = "", data_dir: DataDirOpt = DEFAULT_DATA_DIR) -> None:
    """Write a checkpoint now (atomically) and print where."""
    from flywheel.v1 import learner_pb2

    address, secret = _connection(learner, token, Path(data_dir))
    reply = _call(address, secret, "Checkpoint", learner_pb2.CheckpointRequest())
    typer.echo(f"{reply.path} (step {reply.step}, policy v{reply.policy_version})")  # unwrapped: scripts parse it
