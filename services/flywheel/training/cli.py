"""`flywheel train sft|reward|dpo --data FILE`: the offline stages on a user's own data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

train_app = typer.Typer(help="Offline training stages with TRL's trainers (SFT → reward model → DPO).",
                        no_args_is_help=True)
console = Console(stderr=True)

DEFAULT_MODELS = {"sft": "tiny://llama", "reward": "tiny://reward", "dpo": "tiny://llama"}


def _run(stage: str, data: Path, model: str, out: Path, max_steps: int, epochs: float, learning_rate: float,
         batch_size: int, max_length: int, eval_fraction: float, beta: float) -> None:
    from flywheel.common.logs import setup_logging
    from flywheel.training.data import DataError, load_records
    from flywheel.training.offline import OfflineConfig, train

    setup_logging("WARNING")
    try:
        cfg = OfflineConfig(stage=stage, model=model or DEFAULT_MODELS[stage], out_dir=str(out), epochs=epochs,
                            max_steps=max_steps, learning_rate=learning_rate, batch_size=batch_size,
                            max_length=max_length, eval_fraction=eval_fraction, beta=beta)
        records = load_records(data)
        with console.status(f"training {stage} on {len(records)} records..."):
            summary = train(cfg, records)
    except (DataError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    typer.echo(json.dumps(summary))


Data = Annotated[Path, typer.Option(help="JSONL or Parquet in TRL's format (see `flywheel feedback export`)")]
Out = Annotated[Path, typer.Option(help="Directory for the trained model (replaced atomically)")]
Model = Annotated[str, typer.Option(help="Starting model: hub id, path or tiny://... (default: a tiny model)")]
MaxSteps = Annotated[int, typer.Option(help="Optimizer steps (0 = use --epochs)")]
Epochs = Annotated[float, typer.Option(help="Passes over the data")]
Lr = Annotated[float, typer.Option("--lr", help="Learning rate")]
Batch = Annotated[int, typer.Option(help="Records per step")]
MaxLen = Annotated[int, typer.Option(help="Tokens per sequence")]
EvalFrac = Annotated[float, typer.Option(help="Share held out for evaluation")]


@train_app.command("sft")
def sft(data: Data, out: Out, model: Model = "", max_steps: MaxSteps = 0, epochs: Epochs = 1.0,
        lr: Lr = 5e-5, batch_size: Batch = 8, max_length: MaxLen = 256, eval_fraction: EvalFrac = 0.0) -> None:
    """Supervised fine-tuning on prompt/completion records (e.g. users' corrections)."""
    _run("sft", data, model, out, max_steps, epochs, lr, batch_size, max_length, eval_fraction, 0.1)


@train_app.command("reward")
def reward(data: Data, out: Out, model: Model = "", max_steps: MaxSteps = 0, epochs: Epochs = 1.0,
           lr: Lr = 5e-5, batch_size: Batch = 8, max_length: MaxLen = 256, eval_fraction: EvalFrac = 0.1) -> None:
    """Bradley–Terry reward model on prompt/chosen/rejected pairs; reports held-out pairwise accuracy."""
    _run("reward", data, model, out, max_steps, epochs, lr, batch_size, max_length, eval_fraction, 0.1)


@train_app.command("dpo")
def dpo(data: Data, out: Out, model: Model = "", max_steps: MaxSteps = 0, epochs: Epochs = 1.0,
        lr: Lr = 1e-6, batch_size: Batch = 8, max_length: MaxLen = 256, eval_fraction: EvalFrac = 0.0,
        beta: Annotated[float, typer.Option(help="DPO beta")] = 0.1) -> None:
    """Direct preference optimisation of a policy on prompt/chosen/rejected pairs."""
    _run("dpo", data, model, out, max_steps, epochs, lr, batch_size, max_length, eval_fraction, beta)
