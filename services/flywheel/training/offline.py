"""SFT, reward-model (Bradley–Terry) and DPO training with TRL's trainers on tiny or real models.

Each stage loads the model, trains on validated records, reports held-out numbers, writes a JSONL
metrics log, and saves the result atomically (a complete model directory appears, or none).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.common.tiny_models import resolve_model
from flywheel.training.data import DataError, split_holdout, validate

log = logging.getLogger(__name__)

STAGES = ("sft", "reward", "dpo")


@dataclass(frozen=True)
class OfflineConfig:
    """One offline training run."""

    stage: str
    """'sft', 'reward' or 'dpo'."""
    model: str
    """Starting model: hub id, local path, tiny://llama (sft/dpo) or tiny://reward (reward)."""
    out_dir: str
    """Where the trained model is saved (replaced atomically)."""
    epochs: float = 1.0
    """Passes over the training records (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps; 0 = use epochs."""
    learning_rate: float = 5e-5
    """AdamW learning rate."""
    batch_size: int = 8
    """Records per optimizer step."""
    max_length: int = 256
    """Tokens per sequence (prompt + response); longer ones are truncated."""
    eval_fraction: float = 0.1
    """Share of records held out to report loss / pairwise accuracy (0 = none)."""
    beta: float = 0.1
    """DPO: strength of the implicit KL constraint."""
    seed: int = 0
    """Seed for the split and the trainer."""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r}: choose one of {', '.join(STAGES)}")
        if self.max_steps < 0 or self.epochs <= 0:
            raise ValueError("max_steps must be >= 0 and epochs > 0")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction}: must be in [0, 1)")
        if self.batch_size < 1 or self.max_length < 8 or self.learning_rate <= 0:
            raise ValueError("batch_size >= 1, max_length >= 8 and learning_rate > 0 are required")


def _jsonl_callback(path: Path) -> Any:
    from transformers import TrainerCallback

    class JsonlMetrics(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
            with open(path, "a") as fh:
                fh.write(json.dumps({"step": state.global_step, "time": time.time(), **(logs or {})}) + "\n")

    return JsonlMetrics()


def _trainer_args(cfg: OfflineConfig, work_dir: Path) -> dict[str, Any]:
    import torch

    return {
        "output_dir": str(work_dir / "trainer"),
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps if cfg.max_steps > 0 else -1,
        "learning_rate": cfg.learning_rate,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "eval_strategy": "no",
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "use_cpu": not torch.cuda.is_available(),
        "seed": cfg.seed,
        "disable_tqdm": True,
        "max_length": cfg.max_length,
    }


def pairwise_accuracy(model: Any, tokenizer: Any, pairs: list[dict[str, Any]], max_length: int = 256) -> float:
    """Share of pairs where the reward model scores chosen above rejected."""
    import torch

    if not pairs:
        return float("nan")
    model.eval()
    correct = 0
    with torch.no_grad():
        for pair in pairs:
            texts = [pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            scores = model(**batch.to(model.device)).logits[:, 0]  # (2,)
            correct += int(scores[0] > scores[1])
    return correct / len(pairs)


def train(cfg: OfflineConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs the stage; returns a summary (steps, final loss, held-out metrics, output path)."""
    import datasets
    from transformers import AutoTokenizer

    validate(records, cfg.stage)
    train_rows, held_out = split_holdout(records, cfg.eval_fraction, cfg.seed)
    if not train_rows:
        raise DataError("no training records left after the held-out split: add data or lower eval_fraction")
    model_path = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = Path(cfg.out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        columns = ("prompt", "completion") if cfg.stage == "sft" else ("prompt", "chosen", "rejected")
        dataset = datasets.Dataset.from_list([{c: r[c] for c in columns} for r in train_rows])
        trainer, model = _build_trainer(cfg, model_path, tokenizer, dataset, work)
        trainer.add_callback(_jsonl_callback(work / "model" / "metrics.jsonl"))
        (work / "model").mkdir(exist_ok=True)
        result = trainer.train()
        summary: dict[str, Any] = {"stage": cfg.stage, "steps": trainer.state.global_step,
                                   "train_loss": float(result.training_loss), "train_records": len(train_rows),
                                   "held_out_records": len(held_out)}
        if cfg.stage == "reward" and held_out:
            summary["held_out_accuracy"] = pairwise_accuracy(model, tokenizer, held_out, cfg.max_length)
        model.save_pretrained(work / "model", safe_serialization=True)
        tokenizer.save_pretrained(work / "model")
        (work / "model" / "flywheel_training.json").write_text(json.dumps(summary, indent=2))
        _replace_dir(work / "model", out)
        summary["out_dir"] = str(out)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_trainer(cfg: OfflineConfig, model_path: str, tokenizer: Any, dataset: Any, work: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    args = _trainer_args(cfg, work)
    if cfg.stage == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = RewardTrainer(model=model, args=RewardConfig(**args), train_dataset=dataset,
                                processing_class=tokenizer)
    elif cfg.stage == "dpo":
        model = AutoModelForCausalLM.from_pretrained(model_path)
        trainer = DPOTrainer(model=model, args=DPOConfig(**args, beta=cfg.beta), train_dataset=dataset,
                             processing_class=tokenizer)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path)
        trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=dataset, processing_class=tokenizer)
    return trainer, model


def _replace_dir(new: Path, target: Path) -> None:
    """Moves ``new`` to ``target`` so that readers see the old or the new directory, never a mix."""
    for file in new.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)
