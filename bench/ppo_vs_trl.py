"""Flywheel's PPO vs TRL 1.12.0's experimental PPOTrainer (the last TRL release with PPO) on the same
tiny SFT model, reward, batch shape and budget: evaluation-reward gain per CPU-second of training.

TRL runs in its own virtualenv (``.venv-trl112``: the local torch 2.13.0 wheel, trl==1.12.0,
transformers 5.23.0), created on first use. TRL's PPOTrainer wants a reward *model*; we wrap the
lexicon reward as one (``LexiconRewardModel``: its "backbone" decodes each query+response and puts
the VADER compound at every position, its ``score`` is the identity), so both sides optimise exactly
VADER(prompt + completion). Same settings on both: 16 prompts x 1 sample per step, 2 minibatches,
2 epochs, 8 new tokens, lr 1e-3, kl_coef 0.02, vf_coef 0.1, clip 0.2, gamma 1, lambda 0.95, separate
critic initialised from the SFT policy; evaluation by the same function (HF generate, seed, 4 x 48).

    python -m bench.ppo_vs_trl [--quick]
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRL_VENV = ROOT / ".venv-trl112"
TORCH_WHEEL = "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
TRL_REQUIREMENTS = ["trl==1.12.0", "transformers==5.23.0", "accelerate", "datasets", "vaderSentiment"]
BATCH, MINIBATCHES, EPOCHS, NEW_TOKENS, LR, KL_COEF, VF_COEF = 16, 2, 2, 8, 1e-3, 0.02, 0.1
EVAL_PROMPTS, EVAL_SAMPLES, EVAL_SEED = 48, 4, 12345


# --- shared by both sides (no flywheel imports: this part also runs in the TRL virtualenv) ------
def _scratch_dir() -> str:
    """A temp dir removed when the bench exits."""
    path = tempfile.mkdtemp(prefix="ppo-vs-trl-")
    atexit.register(shutil.rmtree, path, True)
    return path


def vader_scores(texts: list[str]) -> list[float]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


def evaluate_policy(policy: Any, tokenizer: Any, texts: list[str]) -> float:
    """Mean VADER(prompt completion) over EVAL_SAMPLES samples of each prompt (fixed seed)."""
    import torch

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [tokenizer(t, add_special_tokens=False).input_ids for t in texts for _ in range(EVAL_SAMPLES)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # (B, width) left-padded
    torch.manual_seed(EVAL_SEED)
    policy.eval()
    with torch.no_grad():
        out = policy.generate(input_ids=ids, attention_mask=(ids != pad).long(), do_sample=True, top_k=0,
                              temperature=1.0, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=pad)
    completions = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    prompt_texts = [t for t in texts for _ in range(EVAL_SAMPLES)]
    scores = vader_scores([f"{p} {c}" for p, c in zip(prompt_texts, completions, strict=True)])
    return sum(scores) / len(scores)


# --- TRL side (runs in .venv-trl112) ----------------------------------------------------------
def trl_child(model_path: str, steps: int, eval_texts: list[str], train_texts: list[str]) -> dict[str, float]:
    from types import SimpleNamespace

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    class LexiconBackbone(torch.nn.Module):
        def __init__(self, tokenizer: Any) -> None:
            super().__init__()
            self.tokenizer = tokenizer

        def forward(self, input_ids: Any, attention_mask: Any, **_: Any) -> Any:
            texts = [self.tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
                     for row, mask in zip(input_ids, attention_mask, strict=True)]
            scores = torch.tensor(vader_scores(texts))  # (B,)
            hidden = scores[:, None, None].expand(-1, input_ids.shape[1], 1)  # (B, L, 1)
            return SimpleNamespace(hidden_states=[hidden])

    class LexiconRewardModel(torch.nn.Module):
        base_model_prefix = "backbone"

        def __init__(self, tokenizer: Any) -> None:
            super().__init__()
            self.backbone = LexiconBackbone(tokenizer)

        def score(self, hidden: Any) -> Any:
            return hidden

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(model_path)
    ref = AutoModelForCausalLM.from_pretrained(model_path)
    value = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
    before = evaluate_policy(policy, tokenizer, eval_texts)
    dataset = Dataset.from_dict({"input_ids": [tokenizer(t, add_special_tokens=False).input_ids
                                               for t in train_texts]})
    config = PPOConfig(
        output_dir=_scratch_dir(), learning_rate=LR, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, num_mini_batches=MINIBATCHES, num_ppo_epochs=EPOCHS,
        response_length=NEW_TOKENS, total_episodes=steps * BATCH, stop_token="eos", temperature=1.0,
        kl_coef=KL_COEF, vf_coef=VF_COEF, report_to="none", num_sample_generations=0, use_cpu=True,
        save_strategy="no", logging_steps=1, seed=0, local_rollout_forward_batch_size=BATCH,
    )
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref,
                         reward_model=LexiconRewardModel(tokenizer), train_dataset=dataset, value_model=value)
    cpu = time.process_time()
    trainer.train()
    cpu = time.process_time() - cpu
    after = evaluate_policy(trainer.policy_model, tokenizer, eval_texts)
    return {"before": before, "after": after, "cpu_seconds": cpu}


def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import trl.experimental.ppo, vaderSentiment"],
                                          capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", TORCH_WHEEL, *TRL_REQUIREMENTS], check=True)
    return python


# --- ours, and the comparison --------------------------------------------------------------------
def run_ours(model_path: str, steps: int, eval_texts: list[str]) -> dict[str, float]:

    import torch

    from bench.ppo_learning import make_learner

    torch.manual_seed(0)
    learner = make_learner(model_path, Path(_scratch_dir()), prompts_per_step=BATCH, samples_per_prompt=1,
                           minibatch_size=BATCH // MINIBATCHES, ppo_epochs=EPOCHS, max_new_tokens=NEW_TOKENS,
                           learning_rate=LR, init_kl_coef=KL_COEF, vf_coef=VF_COEF)
    before = evaluate_policy(learner.model.policy, learner.tokenizer, eval_texts)
    cpu = time.process_time()
    for _ in range(steps):
        learner.run_step()
    cpu = time.process_time() - cpu
    after = evaluate_policy(learner.model.policy, learner.tokenizer, eval_texts)
    return {"before": before, "after": after, "cpu_seconds": cpu}


def main() -> None:
    from bench._common import parse, report
    from bench.ppo_learning import sft_model
    from flywheel.learner.prompts import builtin_sentiment_prompts

    args = parse(__doc__ or "")
    steps = 20 if args.quick else 80
    model_path = str(sft_model())
    openings = builtin_sentiment_prompts()
    eval_texts = openings[::2][:EVAL_PROMPTS]
    ours = run_ours(model_path, steps, eval_texts)
    python = ensure_trl_venv()
    payload = json.dumps({"model_path": model_path, "steps": steps, "eval": eval_texts, "train": openings})
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run([str(python), str(Path(__file__)), "--trl-child"], input=payload, text=True,
                          capture_output=True, env=env, cwd=str(ROOT))
    if done.returncode:
        raise SystemExit(f"TRL run failed:\n{done.stderr[-4000:]}")
    trl = json.loads(done.stdout.strip().splitlines()[-1])
    gain = {k: (v["after"] - v["before"]) / v["cpu_seconds"] for k, v in (("ours", ours), ("trl", trl))}
    rows = [
        ("budget", f"{steps} PPO steps x {BATCH} samples", f"{EPOCHS} epochs, {MINIBATCHES} minibatches"),
        *[(f"{name}: eval reward before -> after", f"{r['before']:+.3f} -> {r['after']:+.3f}",
           f"{r['cpu_seconds']:.1f} CPU-s") for name, r in (("flywheel", ours), ("trl 1.12.0", trl))],
        ("flywheel gain / CPU-s", f"{gain['ours']:+.4f}", ""),
        ("trl gain / CPU-s", f"{gain['trl']:+.4f}", ""),
    ]
    ratio = gain["ours"] / gain["trl"] if gain["trl"] > 0 else float("inf")
    report("ppo_vs_trl", rows, ours=gain["ours"], baseline=gain["trl"], target=1.0,
           unit="eval reward gain per CPU-second", ratio=ratio)


if __name__ == "__main__":
    if "--trl-child" in sys.argv:
        request = json.loads(sys.stdin.read())
        result = trl_child(request["model_path"], request["steps"], request["eval"], request["train"])
        print(json.dumps(result))
    else:
        main()
