"""Per-sequence decode state for the transformers engine: sampling a batch row by row (each row
its own parameters and seeded generator), stop/EOS/length checks, and stream deltas."""

from __future__ import annotations

from typing import Any

import torch

from flywheel.generator.engine import (
    Cancellation,
    CompletionUnit,
    Sampling,
    StreamDelta,
    sampling_distribution,
)


class Sequence(CompletionUnit):
    """One completion being generated: created by a request, advanced by the batcher thread."""

    def __init__(
        self, prompt_ids: list[int], sampling: Sampling, seed: int, adapter: str, cancellation: Cancellation
    ) -> None:
        super().__init__(prompt_ids, adapter, cancellation)
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(seed)
        self.finished = False
        self._sent_tokens = 0
        self._sent_chars = 0

    def abort_if_cancelled(self, version: int) -> bool:
        """Finishes a sequence whose caller left while it was queued; True if it did."""
        if self.cancellation.cancelled:
            self.version = version
            self._complete("aborted", "")
            return True
        return False

    def append(self, token: int, logprob: float, tokenizer: Any, eos_ids: set[int], version: int) -> None:
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        self.version = version
        if self.cancellation.cancelled:
            self.finish("aborted", tokenizer, version)
        elif token in eos_ids:
            self.finish("eos", tokenizer, version)
        elif self.sampling.stop and _stop_index(self._decode(tokenizer), self.sampling.stop) >= 0:
            self.finish("stop", tokenizer, version)
        elif len(self.token_ids) >= self.sampling.max_new_tokens:
            self.finish("length", tokenizer, version)
        elif self.on_delta is not None:
            self._send(self._visible_text(tokenizer), "")

    def finish(self, reason: str, tokenizer: Any, version: int) -> None:
        self.version = version
        text = self._decode(tokenizer)
        if reason == "stop":
            text = text[: _stop_index(text, self.sampling.stop)]
        self._complete(reason, text)

    def fail(self, error: BaseException) -> None:
        self.finished = True
        super().fail(error)

    # internals -----------------------------------------------------------------------------------
    def _complete(self, reason: str, text: str) -> None:
        self.text = text
        self.finish_reason = reason
        self.finished = True
        if self.on_delta is not None:
            self._send(text, reason)
        self.done.set()

    def _decode(self, tokenizer: Any) -> str:
        return str(tokenizer.decode(self.token_ids, skip_special_tokens=True))

    def _visible_text(self, tokenizer: Any) -> str:
        """Text safe to stream so far: no half UTF-8 character, nothing that may become a stop string."""
        text = self._decode(tokenizer).rstrip("\ufffd")
        hold = max((len(s) for s in self.sampling.stop), default=1) - 1
        return text[: len(text) - hold] if hold else text

    def _send(self, text: str, reason: str) -> None:
        assert self.on_delta is not None
        delta = StreamDelta(
            token_ids=self.token_ids[self._sent_tokens :],
            logprobs=self.logprobs[self._sent_tokens :],
            text_delta=text[self._sent_chars :],
            policy_version=self.version,
            finish_reason=reason,
        )
        self._sent_tokens = len(self.token_ids)
        self._sent_chars = max(self._sent_chars, len(text))
        self.on_delta(delta)


def _stop_index(text: str, stops: tuple[str, ...]) -> int:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else -1


def sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token and its logprob under the processed distribution, per row; greedy rows report 0.0.
    ``logits``: (B, V). Returns (B,) long tokens and (B,) float logprobs."""
    logits = logits.detach().float().cpu()  # (B, V)
    tokens = torch.argmax(logits, dim=-1)  # (B,) greedy default, also for finished rows
    logprobs = torch.zeros(len(seqs))
    for row, seq in enumerate(seqs):
        s = seq.sampling
        if seq.finished or s.greedy:
            continue
        logp = sampling_distribution(logits[row : row + 1], s.temperature, s.top_k, s.top_p)[0]  # (V,)
        token = torch.multinomial(logp.exp(), 1, generator=seq.generator)[0]
        tokens[row] = token
        logprobs[row] = logp[token]
    return tokens, logprobs
