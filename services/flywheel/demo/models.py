"""The demo's starting models, built locally and cached like ``tiny_models`` (keyed by their recipe).

Policy: tiny://llama after a short SFT on the project's sentence corpus, so it writes sentences that a
preference can tell apart (RL needs something to steer). Reward model: the same SFT backbone with a
fresh one-logit head (InstructGPT starts its RM from the SFT model): it knows the language but nothing
of the users' preference, which it must learn from their feedback.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flywheel.common.tiny_models import TinySpec, cache_dir, corpus, tiny_model_path


@dataclass(frozen=True)
class DemoModelSpec:
    """Recipe of the demo policy; any change makes a new cache entry."""

    sft_steps: int = 300
    """Plain-torch SFT steps on corpus sentences."""
    sft_batch_size: int = 32
    """Sentences per SFT step."""
    sft_learning_rate: float = 3e-3
    """AdamW learning rate of the SFT."""
    seed: int = 0
    """Seeds the corpus, the SFT and the reward head."""
    tiny: TinySpec = field(default_factory=TinySpec)
    """The tiny Llama it starts from."""

    def digest(self, kind: str) -> str:
        text = json.dumps({"kind": kind, "v": 1, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    """``cache_dir()/name``, built by ``build(tmp_dir)`` under a lock and renamed in atomically."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if (target / "config.json").exists():
        return target
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
            try:
                build(tmp)
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_policy(spec: DemoModelSpec | None = None) -> Path:
    """The SFT-ed tiny Llama (built on first use, a minute or so on 2 cores)."""
    spec = spec or DemoModelSpec()
    return _cached(f"demo-policy-{spec.digest('policy')}", lambda out: _sft(spec, out))


def demo_reward_model(spec: DemoModelSpec | None = None) -> Path:
    """The SFT backbone with a fresh single-logit head, as a sequence-classification model."""
    spec = spec or DemoModelSpec()
    policy = demo_policy(spec)
    return _cached(f"demo-reward-{spec.digest('reward')}", lambda out: _reward_head(policy, spec, out))


def _sft(spec: DemoModelSpec, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_model_path("llama", spec.tiny)
    torch.manual_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    b = spec.sft_batch_size
    texts = corpus(spec.sft_steps * b, seed=spec.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.sft_learning_rate)
    model.train()
    for step in range(spec.sft_steps):
        batch = tokenizer([t + tokenizer.eos_token for t in texts[step * b:(step + 1) * b]],
                          return_tensors="pt", padding=True, add_special_tokens=False)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)  # (B, L)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _reward_head(policy: Path, spec: DemoModelSpec, out: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch.manual_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is the point here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
