"""The demo's starting models, built locally and cached like ``tiny_models`` (keyed by their recipe).

Policy: tiny://llama after a short SFT on the project's sentence corpus, so it writes sentences that a
preference can tell apart (RL needs something to steer). Reward model: the same SFT backbone with a
fresh one-logit head (InstructGPT starts its RM from the SFT model): it knows the language but nothing
of the users' preference, which it must learn from their feedback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flywheel.common.tiny_models import TinySpec, cached, recipe_digest, sft_on_corpus, tiny_model_path


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
        return recipe_digest(kind, self)


def demo_policy(spec: DemoModelSpec | None = None) -> Path:
    """The SFT-ed tiny Llama (built on first use, a minute or so on 2 cores)."""
    spec = spec or DemoModelSpec()
    base = tiny_model_path("llama", spec.tiny)
    return cached(
        f"demo-policy-{spec.digest('policy')}",
        lambda out: sft_on_corpus(base, out, steps=spec.sft_steps, batch_size=spec.sft_batch_size,
                                  learning_rate=spec.sft_learning_rate, seed=spec.seed),
    )  # fmt: skip


def demo_reward_model(spec: DemoModelSpec | None = None) -> Path:
    """The SFT backbone with a fresh single-logit head, as a sequence-classification model."""
    spec = spec or DemoModelSpec()
    policy = demo_policy(spec)
    return cached(f"demo-reward-{spec.digest('reward')}", lambda out: _reward_head(policy, spec, out))


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
