"""Where the learner's prompts come from: the production prompt stream in Redis (the prompts users sent
the generator) mixed with a configured dataset, a JSONL file (cycled, reshuffled every epoch), with a
position in both that checkpoints restore.

Mixing (``prompt_stream_fraction`` f): over the run, the stream is asked for round(f * prompts drawn)
prompts in all (a cumulative quota: f = 0.3 with 4 prompts a step takes 12 of every 40 prompts from the
stream, not 1 of every 4); whatever the stream cannot supply yet comes from the file. f = 1 is "stream first,
the file tops up". Without a file the learner waits for a full batch from the stream.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.common import keys
from flywheel.common.tiny_models import SUBJECTS, VERBS
from flywheel.v1 import common_pb2, generator_pb2

BUILTIN_SENTIMENT = "builtin://sentiment"


class NoPrompts(Exception):
    """Not enough prompts yet (empty stream and no file); the learner waits."""


@dataclass
class PromptItem:
    """One prompt: plain text or chat messages."""

    prompt_id: str
    text: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)

    def to_proto(self) -> generator_pb2.Prompt:
        if self.messages:
            chat = generator_pb2.ChatMessages(
                messages=[common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in self.messages]
            )
            return generator_pb2.Prompt(prompt_id=self.prompt_id, chat=chat)
        return generator_pb2.Prompt(prompt_id=self.prompt_id, text=self.text)

    @property
    def reward_text(self) -> str:
        """The prompt as the reward service sees it."""
        if self.messages:
            return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)
        return self.text


def builtin_sentiment_prompts() -> list[str]:
    """Sentence openings of the tiny corpus ("the movie was"), for demos, tests and benches."""
    return [f"{subject} {verb}" for subject in SUBJECTS for verb in VERBS]


def load_prompt_file(path: str) -> list[PromptItem]:
    if path == BUILTIN_SENTIMENT:
        return [PromptItem(f"builtin-{i}", text=t) for i, t in enumerate(builtin_sentiment_prompts())]
    file = Path(path).expanduser()
    items = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if isinstance(record, str):
            record = {"prompt": record}
        messages = record.get("messages") or []
        text = record.get("prompt", record.get("text", ""))
        if not text and not messages:
            raise ValueError(f"{file}:{number}: expected a 'prompt' (or 'text' / 'messages') field")
        items.append(PromptItem(str(record.get("id", f"{file.stem}-{number}")), text=text, messages=messages))
    if not items:
        raise ValueError(f"prompts_file {file} has no prompts")
    return items


class PromptSource:
    """Draws batches: the stream's quota of entries after ``stream_id``, then the file in a seeded order."""

    def __init__(self, prompts_file: str, use_stream: bool, redis: Any, seed: int, stream_fraction: float = 1.0) -> None:
        self.items = load_prompt_file(prompts_file) if prompts_file else []
        self.use_stream = use_stream
        self.redis = redis
        self.seed = seed
        self.stream_fraction = stream_fraction
        self.epoch = 0
        self.index = 0
        self.stream_id = "0-0"
        self.drawn = 0  # prompts handed out so far (the stream quota is a share of these)
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def stream_quota(self, k: int) -> int:
        """Prompts of the next batch of ``k`` to ask the stream for (cumulative rounding of the fraction)."""
        if not self.items:
            return k  # no dataset to mix in: everything from the stream
        share = lambda n: math.floor(self.stream_fraction * n + 0.5)  # noqa: E731
        return share(self.drawn + k) - share(self.drawn)

    def next_batch(self, k: int) -> list[PromptItem]:
        quota = self.stream_quota(k)
        batch = self._from_stream(quota) if self.use_stream and self.redis is not None and quota else []
        while len(batch) < k and self.items:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle()
            batch.append(self.items[self._order[self.index]])
            self.index += 1
        if len(batch) < k:
            where = "the prompt stream flywheel:prompts has too few new entries"
            raise NoPrompts(f"no prompts: {where} and prompts_file is unset (need {k}, have {len(batch)})")
        self.drawn += k
        return batch

    def _from_stream(self, k: int) -> list[PromptItem]:
        entries = self.redis.xrange(keys.PROMPTS_STREAM, min=f"({self.stream_id}", count=k)
        if len(entries) < k and not self.items:
            return []  # wait for a full batch rather than consume a partial one
        out = []
        for entry_id, fields in entries:
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            data = {(a.decode() if isinstance(a, bytes) else a): (b.decode() if isinstance(b, bytes) else b)
                    for a, b in fields.items()}
            messages = json.loads(data["prompt_messages"]) if data.get("prompt_messages") else []
            out.append(PromptItem(f"stream-{entry_id}", text=data.get("prompt", ""), messages=messages))
            self.stream_id = entry_id
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "stream_id": self.stream_id, "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index, self.stream_id = int(state["epoch"]), int(state["index"]), str(state["stream_id"])
        self.drawn = int(state.get("drawn", 0))  # checkpoints from before mixing have no count
        self._order = self._shuffle()
