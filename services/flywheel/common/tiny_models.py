"""Tiny models built locally, for tests and the demo (this machine cannot reach a model hub).

``tiny://llama`` is a small Llama-style causal LM with random weights; ``tiny://reward`` the same
backbone with a single-logit sequence-classification head. Both share a byte-level BPE tokenizer
trained here with ``tokenizers`` on text the project generates, with a chat template. They are
saved with ``save_pretrained`` under the cache dir and reused; real users pass hub ids or paths to
the same config fields instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TINY_SCHEME = "tiny://"
KINDS = ("llama", "reward")

SUBJECTS = [
    "the movie",
    "this film",
    "the food",
    "my day",
    "the service",
    "the book",
    "our trip",
    "the song",
    "the weather",
    "the game",
    "the hotel",
    "the class",
    "this phone",
    "the show",
    "the team",
]
VERBS = ["was", "is", "felt", "seemed", "looked", "sounded", "became"]
POSITIVE = [
    "good",
    "great",
    "wonderful",
    "lovely",
    "excellent",
    "happy",
    "amazing",
    "nice",
    "fun",
    "beautiful",
]
NEGATIVE = ["bad", "terrible", "awful", "sad", "boring", "horrible", "ugly", "poor", "dull", "annoying"]
ENDINGS = [".", "!", " and I liked it.", " but it was long.", " today.", " again.", " to me.", " overall."]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    seed: int = 0

    def digest(self, kind: str) -> str:
        return recipe_digest(kind, self)


def recipe_digest(kind: str, recipe: Any) -> str:
    """A short cache key for a model built by ``kind`` from the dataclass ``recipe``: any change to
    the recipe makes a new key."""
    text = json.dumps({"kind": kind, "v": 1, **asdict(recipe)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def corpus(n: int, seed: int = 0) -> list[str]:
    """Short sentences with sentiment words, the same for the same seed."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        adjective = rng.choice(POSITIVE if rng.random() < 0.5 else NEGATIVE)
        lines.append(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {adjective}{rng.choice(ENDINGS)}")
    return lines


def cache_dir() -> Path:
    return Path(os.environ.get("FLYWHEEL_CACHE_DIR", "~/.cache/flywheel")).expanduser() / "models"


def _train_tokenizer(spec: TinySpec):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(5000, spec.seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(kind: str, out_dir: Path, spec: TinySpec) -> None:
    """Builds the tiny model ``kind`` with random weights (seeded) into ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = _train_tokenizer(spec)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        num_labels=1,
    )
    torch.manual_seed(spec.seed)
    model_cls = LlamaForCausalLM if kind == "llama" else LlamaForSequenceClassification
    model = model_cls(config)
    if kind == "llama":
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def cached(name: str, build: Callable[[Path], None]) -> Path:
    """``cache_dir()/name``, built first if needed by ``build(tmp_dir)`` under a file lock and renamed
    in atomically: readers see a complete model or none, and concurrent processes build it once."""
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


def tiny_model_path(kind: str = "llama", spec: TinySpec | None = None) -> Path:
    """Path of the cached tiny model ``kind``, building it first if needed (safe across processes)."""
    if kind not in KINDS:
        raise ValueError(
            f"unknown tiny model {kind!r}: use one of {', '.join(TINY_SCHEME + k for k in KINDS)}"
        )
    spec = spec or TinySpec()
    return cached(f"tiny-{kind}-{spec.digest(kind)}", lambda out: build(kind, out, spec))


def sft_on_corpus(base: Path, out: Path, *, steps: int, batch_size: int, learning_rate: float, seed: int) -> None:
    """Plain-torch SFT of the causal LM at ``base`` on ``corpus`` sentences (each ending in EOS),
    saved with its tokenizer to ``out``: teaches a random tiny model to write sentences."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    texts = corpus(steps * batch_size, seed=seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    for step in range(steps):
        batch = tokenizer([t + tokenizer.eos_token for t in texts[step * batch_size : (step + 1) * batch_size]],
                          return_tensors="pt", padding=True, add_special_tokens=False)  # fmt: skip
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)  # (B, L)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve_model(model: str) -> str:
    """Turns ``tiny://KIND`` into a local path; hub ids and paths pass through unchanged."""
    if model.startswith(TINY_SCHEME):
        return str(tiny_model_path(model[len(TINY_SCHEME) :]))
    return model
