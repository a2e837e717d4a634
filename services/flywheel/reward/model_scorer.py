"""The Hugging Face reward model: any ``AutoModelForSequenceClassification`` with a single logit.

Holds the model, its tokenizer and the current ``version``. ``score_batch`` and ``load_tensors``
take the same lock, so a batch runs on exactly one version and a weight swap lands between
batches. New tensors are checked (names, shapes, dtypes, finite) *before* the first one is copied,
so a rejected update leaves every parameter as it was.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from flywheel.common.config import ConfigError
from flywheel.common.tiny_models import resolve_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightMismatch(ValueError):
    """New tensors do not fit the model (name, shape, dtype) or hold NaN/inf; ``reason`` labels it."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RewardModel:
    """A single-logit sequence-classification model scoring (prompt, completion) pairs."""

    kind = "model"

    def __init__(
        self, model_id: str, device: str, dtype: str, max_length_tokens: int, torch_threads: int = 0
    ) -> None:
        self.torch_threads = torch_threads
        self.model_id = model_id
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.max_length_tokens = max_length_tokens
        self.version = 0
        self.lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None

    @property
    def source(self) -> str:
        return self.model_id

    def load(self) -> None:
        """Loads tokenizer and weights (slow); raises ConfigError when the model cannot be a reward model."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if self.torch_threads:
            # Intra-op threads that wait on each other lose badly when other processes hold the cores.
            torch.set_num_threads(self.torch_threads)
        if self.torch_threads == 1:
            # Same reason for the tokenizer's thread pool: on a busy CPU its threads spin waiting
            # for a core (~50 us of CPU per request measured) and a batch of short texts gains
            # nothing from splitting. An explicit TOKENIZERS_PARALLELISM still wins.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        path = resolve_model(self.model_id)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=self.dtype)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model={self.model_id!r} cannot be loaded as a reward model: {exc}") from exc
        if model.config.num_labels != 1:
            raise ConfigError(
                f"model={self.model_id!r} has {model.config.num_labels} labels: a reward model needs "
                "exactly one logit (num_labels=1)"
            )
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ConfigError(f"model={self.model_id!r}: its tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        # The head reads the last non-pad token, found through pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id
        # Over-long inputs lose the start of the prompt: the head reads the completion's end.
        tokenizer.truncation_side = "left"
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and self.max_length_tokens > limit:
            log.warning("max_length_tokens=%d exceeds the model's %d positions; using %d",
                        self.max_length_tokens, limit, limit)
            self.max_length_tokens = int(limit)
        model.to(self.device).eval()
        self._model, self._tokenizer = model, tokenizer
        log.info("reward model %s loaded (%d parameters)", self.model_id,
                 sum(p.numel() for p in model.parameters()))

    def _encode(self, pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
        tok = self._tokenizer
        common = {"padding": True, "truncation": True, "max_length": self.max_length_tokens,
                  "return_tensors": "pt"}
        if tok.chat_template:
            # One call for the whole batch: the template is looked up and set up once, not per pair.
            texts = tok.apply_chat_template(
                [[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in pairs],
                tokenize=False,
            )
            # The template already places the special tokens the model was trained with.
            return tok(texts, add_special_tokens=False, **common)  # type: ignore[no-any-return]
        return tok([p for p, _ in pairs], [c for _, c in pairs], **common)  # type: ignore[no-any-return]

    def score_batch(self, pairs: list[tuple[str, str]]) -> list[tuple[float, int]]:
        """One logit per pair, each with the model version that produced it (the same for all)."""
        if self._model is None:
            raise RuntimeError("the reward model is not loaded yet")
        batch = self._encode(pairs)
        with self.lock, torch.inference_mode():
            version = self.version
            logits = self._model(**{k: v.to(self.device) for k, v in batch.items()}).logits  # (B, 1)
        values = logits[:, 0].float().cpu().tolist()
        return [(v, version) for v in values]

    def state(self) -> dict[str, torch.Tensor]:
        """The current tensors by state_dict name (live references: do not modify)."""
        return dict(self._model.state_dict())

    def check_tensors(self, tensors: Mapping[str, torch.Tensor], full: bool) -> None:
        """Raises WeightMismatch unless every tensor matches a parameter and holds finite values."""
        current = self._model.state_dict()
        unknown = sorted(set(tensors) - set(current))
        if unknown:
            raise WeightMismatch(f"unknown tensors {unknown[:5]} (the model has no such parameters)", "unknown_tensor")
        missing = sorted(set(current) - set(tensors))
        if full and missing:
            raise WeightMismatch(f"a full update is missing {len(missing)} tensors, e.g. {missing[:5]}", "missing_tensor")
        for name, tensor in tensors.items():
            have = current[name]
            if tuple(tensor.shape) != tuple(have.shape):
                raise WeightMismatch(
                    f"tensor {name!r} has shape {list(tensor.shape)}, the model needs {list(have.shape)}", "shape_mismatch"
                )
            if tensor.dtype != have.dtype:
                raise WeightMismatch(f"tensor {name!r} is {tensor.dtype}, the model needs {have.dtype}", "dtype_mismatch")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise WeightMismatch(f"tensor {name!r} holds NaN or infinite values", "non_finite")

    def load_tensors(self, tensors: Mapping[str, torch.Tensor], version: int, full: bool) -> int:
        """Checks, then copies ``tensors`` in and sets ``version``, between batches. Returns the count."""
        self.check_tensors(tensors, full)
        current = self._model.state_dict()
        with self.lock, torch.no_grad():
            for name, tensor in tensors.items():
                current[name].copy_(tensor)
            self.version = version
        return len(tensors)
