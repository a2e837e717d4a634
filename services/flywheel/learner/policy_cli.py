"""`flywheel policy ...`: the policy registry through the learner's gRPC API (mounted by flywheel.cli).

The learner is ``--learner HOST:PORT`` with the internal token from ``--token`` /
$FLYWHEEL_INTERNAL_TOKEN; without them, the local `flywheel up` cluster (its cluster.json).
Exit codes: 0 done, 1 the learner refused or failed (e.g. unknown version, unreachable), 2 bad input.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

policy_app = typer.Typer(help="Policy registry: list versions, promote one, roll back.", no_args_is_help=True)
console = Console(stderr=True)
out = Console()

DEFAULT_DATA_DIR = Path("~/.local/share/flywheel")
TIMEOUT = 600.0  # a rollback waits for the learner's current step, then pushes to every generator

LearnerOpt = Annotated[str, typer.Option("--learner", envvar="FLYWHEEL_LEARNER",
                                         help="Learner HOST:PORT (default: the local `flywheel up` cluster)")]
TokenOpt = Annotated[str, typer.Option("--token", envvar="FLYWHEEL_INTERNAL_TOKEN",
                                       help="Internal token (default: the local cluster's)")]
DataDirOpt = Annotated[Path, typer.Option(help="Data dir of a running `flywheel up` (for its cluster.json)")]


def _fail(message: str, code: int) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _connection(learner: str, token: str, data_dir: Path) -> tuple[str, str]:
    """(address, token) from the options, falling back to the local cluster's state file."""
    if learner:
        host, sep, port = learner.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise _fail(f"--learner {learner!r}: expected HOST:PORT", 2)
    if learner and token:
        return learner, token
    from flywheel.cluster import STATE_FILE, ClusterState

    state_path = data_dir.expanduser() / STATE_FILE
    if not state_path.is_file():
        raise _fail(f"no running cluster at {state_path}: pass --learner HOST:PORT and --token "
                    f"(or set FLYWHEEL_INTERNAL_TOKEN), or start one with `flywheel up`", 2)
    state = ClusterState.load(state_path)
    if not learner and "learner" not in state.services:
        raise _fail(f"{state_path} lists no learner: pass --learner HOST:PORT", 2)
    return learner or state.services["learner"].address, token or state.internal_token


def _call(address: str, token: str, method: str, request: Any) -> Any:
    """One LearnerService call; gRPC errors become exit codes (INVALID_ARGUMENT 2, others 1)."""
    import grpc

    from flywheel.v1 import learner_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = learner_pb2_grpc.LearnerServiceStub(channel)
        try:
            return getattr(stub, method)(request, timeout=TIMEOUT, metadata=[("authorization", f"Bearer {token}")])
        except grpc.RpcError as exc:
            code = exc.code()
            bad_input = code == grpc.StatusCode.INVALID_ARGUMENT
            raise _fail(f"{method} on {address}: {code.name}: {exc.details()}", 2 if bad_input else 1) from exc


def _version(value: int | None, what: str) -> None:
    if value is not None and value < 0:
        raise _fail(f"{what}={value}: a policy version is >= 0", 2)


@policy_app.command("list")
def list_command(
    limit: Annotated[int, typer.Option(help="At most this many, newest first")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line instead of a table")] = False,
    learner: LearnerOpt = "", token: TokenOpt = "", data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """Registered policy versions with lineage (parent, restored-from, step, reward model, metrics)."""
    from google.protobuf.json_format import MessageToDict

    from flywheel.v1 import learner_pb2

    if not 1 <= limit <= 10_000:
        raise _fail(f"--limit {limit}: choose 1..10000", 2)
    address, secret = _connection(learner, token, data_dir)
    reply = _call(address, secret, "ListPolicies", learner_pb2.ListPoliciesRequest(limit=limit))
    if as_json:
        for record in reply.policies:
            out.print_json(json.dumps(MessageToDict(record, preserving_proto_field_name=True)), indent=None)
        return
    table = Table(title=f"policies on {address}")
    for column in ("version", "parent", "restored from", "step", "rm", "reason", "created", "metrics", "flags"):
        table.add_column(column)
    for r in reply.policies:
        flags = " ".join(f for f, on in (("current", r.current), ("promoted", r.promoted),
                                         ("restorable", r.restorable)) if on)
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(r.metrics.items()))
        created = datetime.fromtimestamp(r.created_at.ToNanoseconds() / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(str(r.version), str(r.parent_version), str(r.restored_from_version)
                      if r.restored_from_version >= 0 else "", str(r.step), str(r.reward_model_version), r.reason,
                      created, metrics, flags)
    out.print(table)


@policy_app.command("promote")
def promote_command(
    version: Annotated[int, typer.Argument(help="Registered version to mark known-good")],
    learner: LearnerOpt = "", token: TokenOpt = "", data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """Mark VERSION as the known-good policy: the default rollback target, never pruned."""
    from flywheel.v1 import learner_pb2

    _version(version, "VERSION")
    address, secret = _connection(learner, token, data_dir)
    reply = _call(address, secret, "PromotePolicy", learner_pb2.PromotePolicyRequest(version=version))
    out.print(f"promoted version {reply.policy.version}")


@policy_app.command("rollback")
def rollback_command(
    to: Annotated[Optional[int], typer.Option("--to", help="Version to restore (default: the promoted one, else the current one's parent)")] = None,  # noqa: UP045
    reason: Annotated[str, typer.Option(help="Why (logged by the learner)")] = "",
    learner: LearnerOpt = "", token: TokenOpt = "", data_dir: DataDirOpt = DEFAULT_DATA_DIR,
) -> None:
    """Restore an earlier version's weights and push them to every generator as a new version."""
    from flywheel.v1 import learner_pb2

    _version(to, "--to")
    address, secret = _connection(learner, token, data_dir)
    request = learner_pb2.RollbackPolicyRequest(reason=reason)
    if to is not None:
        request.version = to
    reply = _call(address, secret, "RollbackPolicy", request)
    out.print(f"restored version {reply.restored_from_version}; generators now serve it as version "
              f"{reply.new_policy_version}")
