"""In-process rollouts: sample from the learner's own policy with ``generate`` and score with a local
function. For benches and experiments without the services; the production path is ``rollout.py``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from flywheel.learner.config import LearnerConfig
from flywheel.learner.prompts import PromptItem
from flywheel.learner.rollout import GeneratedBatch

ScoreFn = Callable[[Sequence[str], Sequence[str]], list[float]]


def vader_score_fn(include_prompt: bool = True) -> ScoreFn:
    """VADER compound sentiment in [-1, 1] of prompt + completion (or the completion alone)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def score(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        texts = [f"{p} {c}" if include_prompt else c for p, c in zip(prompts, completions, strict=True)]
        return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]

    return score


class PolicySampler:
    """A RolloutSource that samples ``samples_per_prompt`` completions from ``policy`` per prompt."""

    def __init__(self, policy: Any, tokenizer: Any, config: LearnerConfig, score_fn: ScoreFn) -> None:
        self.policy = policy
        self.tokenizer = tokenizer
        self.config = config
        self.score_fn = score_fn
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)

    @torch.no_grad()
    def generate(self, prompts: list[PromptItem], seed: int) -> GeneratedBatch:
        cfg = self.config
        n = cfg.samples_per_prompt
        prompt_ids = [self.tokenizer(p.text, add_special_tokens=False).input_ids for p in prompts]
        rows = [ids for ids in prompt_ids for _ in range(n)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # left-padded
        attention_mask = torch.zeros_like(input_ids)
        for b, ids in enumerate(rows):
            input_ids[b, width - len(ids):] = torch.tensor(ids)
            attention_mask[b, width - len(ids):] = 1
        torch.manual_seed(seed)
        was_training = self.policy.training
        self.policy.eval()
        out = self.policy.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=cfg.temperature,
            top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens, eos_token_id=self.eos_id,
            pad_token_id=self.pad_id, use_cache=True,
        )  # (B, width + new)
        self.policy.train(was_training)
        batch = GeneratedBatch(list(prompts), [], [], [], [], [], [])
        for b, row in enumerate(out[:, width:].tolist()):
            completion = row[: row.index(self.eos_id) + 1] if self.eos_id in row else row
            batch.prompt_ids.append(rows[b])
            batch.completion_ids.append(completion)
            batch.completion_texts.append(self.tokenizer.decode(completion, skip_special_tokens=True))
            batch.truncated.append(self.eos_id not in completion)
            batch.policy_versions.append(0)
        return batch

    def score(self, prompt_texts: list[str], completion_texts: list[str]) -> tuple[list[float], int]:
        return self.score_fn(prompt_texts, completion_texts), 0
