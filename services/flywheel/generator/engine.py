"""The engine interface every generator backend implements, and the types it speaks (no grpc here).

An engine samples completions for token-id prompts, reports for every token the logprob under
the distribution it actually sampled from (``sampling_distribution``), tags every completion with
the policy version whose weights produced all of its tokens, and swaps in verified weight pushes
(``flywheel.common.weights.StagedWeights``) atomically between the steps that use the weights.
"""

from __future__ import annotations

import abc
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import torch

from flywheel.common.weights import StagedWeights

FINISH_REASONS = ("eos", "length", "stop", "aborted")


class EngineError(Exception):
    """Base class: the servicer maps subclasses to status codes."""


class InvalidRequest(EngineError):
    """The request cannot be served as asked (INVALID_ARGUMENT): unknown adapter, prompt too long..."""


class EngineOverloaded(EngineError):
    """The bounded queue is full (RESOURCE_EXHAUSTED): retry later."""


class EngineStopped(EngineError):
    """The engine is shutting down or not loaded (UNAVAILABLE)."""


@dataclass(frozen=True)
class Sampling:
    """Validated sampling parameters of one request (see SamplingParams in generator.proto)."""

    n: int = 1
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()
    seed: int | None = None
    """Completion i of a seeded request uses seed + i, so the n samples differ but replay exactly."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    policy_version: int


@dataclass
class StreamDelta:
    """One step of a streamed completion; ``finish_reason`` is set on the last one."""

    token_ids: list[int]
    logprobs: list[float]
    text_delta: str
    policy_version: int
    finish_reason: str = ""


@dataclass
class SwapResult:
    version: int
    previous_version: int
    tensors_updated: int
    swapped_at: datetime


@dataclass
class PolicyInfo:
    version: int
    model_id: str
    engine: str
    dtype: str
    parameter_count: int
    last_push_time: datetime | None
    adapter_names: list[str]
    metadata: dict[str, str] = field(default_factory=dict)


class Cancellation:
    """Set when the caller went away (deadline, cancel): the engine stops working on it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def sampling_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Log-probabilities of the distribution sampled from: logits/temperature, top-k, then top-p
    on the renormalised top-k distribution, renormalised again. Filtered tokens get -inf.
    ``logits``: (B, V) float. The one definition every engine and test uses."""
    scaled = logits.float() / temperature  # (B, V)
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)  # (B, V)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


class Engine(abc.ABC):
    """A generation backend. Thread-safe: the servicer calls it from many RPC threads."""

    name: str = ""

    @property
    @abc.abstractmethod
    def policy_version(self) -> int: ...

    @abc.abstractmethod
    def load(self) -> None:
        """Loads the model and starts background work (called from the server's on_load hook)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stops background work; queued requests fail with EngineStopped."""

    @abc.abstractmethod
    def tokenize(self, text: str | None = None, chat: list[dict[str, str]] | None = None) -> list[int]:
        """Prompt token ids for plain text or chat messages (chat template applied)."""

    @abc.abstractmethod
    def decode(self, token_ids: list[int]) -> str:
        """Text of token ids (special tokens kept: this is what the model saw)."""

    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def generate(
        self, prompts: list[list[int]], sampling: Sampling, adapter_name: str, cancellation: Cancellation
    ) -> list[list[Completion]]:
        """Blocks until every prompt's n completions are done (cancelled ones end 'aborted').
        All prompts are queued at once (so they can share batches) or none is (EngineOverloaded)."""

    @abc.abstractmethod
    def stream(
        self, prompt_ids: list[int], sampling: Sampling, adapter_name: str, cancellation: Cancellation
    ) -> Iterator[StreamDelta]:
        """Yields one completion step by step (sampling.n must be 1)."""

    @abc.abstractmethod
    def weights_for_push(self) -> Mapping[str, torch.Tensor]:
        """Name -> tensor of the serving weights (checkpoint names): shapes/dtypes and delta base."""

    @abc.abstractmethod
    def apply_weights(self, staged: StagedWeights) -> SwapResult:
        """Swaps a verified push in atomically between batches. Re-checks version/base under the
        swap lock (another push may have landed since staging): raises WeightPushError."""

    @abc.abstractmethod
    def policy(self) -> PolicyInfo: ...

    def add_stats_listener(self, listener: Callable[[str, float], None]) -> None:
        """Optional hook for metrics ("batch_size", n), ("tokens", n), ("ttft", s), ("queue", n)."""
        self._listeners = [*getattr(self, "_listeners", []), listener]

    def _emit(self, what: str, value: float) -> None:
        for listener in getattr(self, "_listeners", []):
            listener(what, value)


class CompletionUnit:
    """One completion as a ``QueuedEngine`` queues it: what generate and stream read (``done``,
    ``result()``, the ``on_delta``/``on_error`` callbacks) and the state every engine keeps for it;
    each engine's unit adds how it is advanced."""

    def __init__(self, prompt_ids: list[int], adapter: str, cancellation: Cancellation) -> None:
        self.prompt_ids = prompt_ids
        self.adapter = adapter
        self.cancellation = cancellation
        self.version = -1
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.finish_reason = ""
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.enqueued_at = time.monotonic()
        self.on_delta: Callable[[StreamDelta], None] | None = None
        self.on_error: Callable[[BaseException], None] | None = None

    def fail(self, error: BaseException) -> None:
        self.error = error
        if self.on_error is not None:
            self.on_error(error)
        self.done.set()

    def result(self) -> Completion:
        if self.error is not None:
            raise self.error
        return Completion(list(self.token_ids), list(self.logprobs), self.text, self.finish_reason, self.version)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The ``dtype`` config values an engine loads weights in."""


class QueuedEngine(Engine):
    """An engine whose requests become queued units (one per completion) that an engine thread
    finishes: generate and stream are the same for every such engine; each engine says how to make
    its units and how to queue them. A unit has ``done`` (an Event), ``result()``, and the
    ``on_delta``/``on_error`` callbacks streaming uses.

    Prompts, the version and ``policy()`` are the same too, from what every such engine keeps:
    ``config``, ``model_id``, a Hugging Face ``tokenizer``, ``_version``, ``_weights`` (the push
    base), ``_metadata`` and ``_last_push`` of the version serving."""

    config: Any
    model_id: str
    tokenizer: Any
    _version: int
    _weights: dict[str, torch.Tensor]
    _metadata: dict[str, str]
    _last_push: datetime | None

    def tokenize(self, text: str | None = None, chat: list[dict[str, str]] | None = None) -> list[int]:
        if chat is not None:
            ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in self.tokenizer.encode(text or "", add_special_tokens=False)]

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=False))

    @property
    def policy_version(self) -> int:
        return self._version

    @abc.abstractmethod
    def _adapter_names(self) -> list[str]:
        """The LoRA adapters loaded now, sorted."""

    def policy(self) -> PolicyInfo:
        return PolicyInfo(
            version=self._version,
            model_id=self.model_id,
            engine=self.name,
            dtype=self.config.dtype,
            parameter_count=sum(t.numel() for t in self._weights.values()),
            last_push_time=self._last_push,
            adapter_names=self._adapter_names(),
            metadata=dict(self._metadata),
        )

    @staticmethod
    def _check_context(prompt_tokens: int, max_new_tokens: int, limit: int | None) -> None:
        """InvalidRequest when a prompt and its completion cannot fit the model's context."""
        if limit and prompt_tokens + max_new_tokens > limit:
            raise InvalidRequest(
                f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) "
                f"exceeds the model's context of {limit}"
            )

    @abc.abstractmethod
    def _units(self, prompt_ids: list[int], sampling: Sampling, adapter: str, cancellation: Cancellation) -> list[Any]:
        """One unit per completion of one prompt (sampling.n of them)."""

    @abc.abstractmethod
    def _submit(self, units: list[Any]) -> None:
        """Queues all units at once, or none (raises InvalidRequest / EngineOverloaded / EngineStopped)."""

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, adapter_name: str, cancellation: Cancellation
    ) -> list[list[Completion]]:
        groups = [self._units(ids, sampling, adapter_name, cancellation) for ids in prompts]
        self._submit([unit for group in groups for unit in group])
        for group in groups:
            for unit in group:
                unit.done.wait()
        return [[unit.result() for unit in group] for group in groups]

    def stream(
        self, prompt_ids: list[int], sampling: Sampling, adapter_name: str, cancellation: Cancellation
    ) -> Iterator[StreamDelta]:
        deltas: queue.Queue[StreamDelta | BaseException] = queue.Queue()
        (unit,) = self._units(prompt_ids, sampling, adapter_name, cancellation)
        unit.on_delta = deltas.put
        unit.on_error = deltas.put
        self._submit([unit])
        while True:
            item = deltas.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason:
                return
