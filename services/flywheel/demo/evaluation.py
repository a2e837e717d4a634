"""The demo's yardstick: the users' own preference score on fresh prompts, measured through the
generator (what users would get), with fixed sampling seeds so runs and versions compare fairly.

Prompts are the tiny corpus' sentence openings ("the movie was"); whole subjects are held out, so the
evaluation prompts never reach the users or the learner.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.common.tiny_models import SUBJECTS, VERBS
from flywheel.demo.preferences import Preference
from flywheel_client import FlywheelClient, GenerateResult

HELDOUT_SUBJECTS = 4
EVAL_CONCURRENCY = 8


@dataclass(frozen=True)
class PromptSplit:
    train: list[str]
    """Prompts the users send (and the learner rolls out on)."""
    heldout: list[str]
    """Fresh prompts, only for evaluation."""

    def write_train_jsonl(self, path: Path) -> Path:
        path.write_text("".join(json.dumps({"id": f"demo-{i}", "prompt": p}) + "\n"
                                for i, p in enumerate(self.train)))
        return path


def split_prompts(seed: int = 0, heldout_subjects: int = HELDOUT_SUBJECTS) -> PromptSplit:
    """Openings grouped by subject; ``heldout_subjects`` whole subjects (seeded) are held out."""
    subjects = list(SUBJECTS)
    random.Random(seed).shuffle(subjects)
    held = set(subjects[:heldout_subjects])
    train = [f"{s} {v}" for s in SUBJECTS if s not in held for v in VERBS]
    heldout = [f"{s} {v}" for s in SUBJECTS if s in held for v in VERBS]
    return PromptSplit(train, heldout)


@dataclass
class Evaluation:
    """Mean preference score of ``samples`` answers to each held-out prompt from one policy version."""

    policy_version: int
    score: float
    count: int
    examples: list[dict[str, object]] = field(default_factory=list)


def evaluate(client: FlywheelClient, prompts: list[str], preference: Preference, samples: int = 4,
             max_new_tokens: int = 10, seed: int = 4242, examples: int = 6) -> Evaluation:
    """Samples answers at temperature 1, prompt i with seed ``seed + i`` (one seed for all would give
    every prompt the same random draws), not logged (purpose=evaluation). Requests run concurrently so
    the generator batches them."""

    def one(i: int) -> GenerateResult:
        return client.generate(prompts[i], n=samples, max_new_tokens=max_new_tokens, temperature=1.0,
                               seed=seed + i, purpose="evaluation", timeout_s=120.0)

    with ThreadPoolExecutor(max_workers=EVAL_CONCURRENCY) as pool:
        results = list(pool.map(one, range(len(prompts))))
    scores: list[float] = []
    versions: set[int] = set()
    shown: list[dict[str, object]] = []
    for prompt, result in zip(prompts, results, strict=True):
        for completion in result.completions:
            score = preference(completion.text)
            scores.append(score)
            versions.add(completion.policy_version)
            if len(shown) < examples and completion is result.completions[0]:
                shown.append({"prompt": prompt, "completion": completion.text, "score": round(score, 4)})
    if not scores:
        raise RuntimeError("the generator returned no completions for the evaluation prompts")
    return Evaluation(max(versions), sum(scores) / len(scores), len(scores), shown)
