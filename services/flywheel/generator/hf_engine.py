"""The transformers engine: dynamic batching of concurrent requests over a KV-cached decode loop.

One background thread owns the model. It collects queued sequences (up to ``max_batch_size``,
waiting at most ``max_wait_ms`` for more once the first arrived), left-pads them into one batch
and runs a manual decode loop with ``past_key_values``, so every row keeps its own sampling
parameters, seed and stop strings and its logprobs come from the processed distribution
(``engine.sampling_distribution``). A batch runs to completion under the swap lock, and weight
pushes take that lock, so all tokens of a completion come from one version — the one it reports.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import torch

from flywheel.common.tiny_models import resolve_model
from flywheel.common.weights import StagedWeights, swap_in
from flywheel.generator.config import GeneratorConfig
from flywheel.generator.decode import Sequence, sample_rows
from flywheel.generator.engine import (
    DTYPES,
    Cancellation,
    EngineOverloaded,
    EngineStopped,
    InvalidRequest,
    QueuedEngine,
    Sampling,
    SwapResult,
)
from flywheel.generator.lora import LoraAdapters

log = logging.getLogger(__name__)


class TransformersEngine(QueuedEngine):
    name = "transformers"

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.model_id = config.model
        self.model: Any = None
        self.tokenizer: Any = None
        self._weights: dict[str, torch.Tensor] = {}
        self._live: dict[str, torch.Tensor] | None = None
        self._version = 0
        self._metadata: dict[str, str] = {}
        self._last_push: datetime | None = None
        self._swap_lock = threading.Lock()  # held for a whole batch, and for a swap
        self._cond = threading.Condition()  # guards the queue
        self._queue: deque[Sequence] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._adapters: LoraAdapters | None = None
        self._eos_ids: set[int] = set()

    # --- lifecycle ------------------------------------------------------------------------------
    def load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(self.config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[self.config.dtype])
        self.model = model.to(self.config.device).eval()
        # Live tensors by checkpoint name: the model's own Parameters and buffers (the same objects
        # also after LoRA wrapping, which keeps the base modules), so a push can hand its staged
        # memory to them (``swap_in``); ``_weights`` is their detached view, refreshed per push.
        self._weights = dict(self.model.state_dict())
        self._live = _model_tensors(self.model, self._weights)
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self._eos_ids = {int(e) for e in eos if e is not None} | {int(self.tokenizer.eos_token_id)}
        self._adapters = LoraAdapters(self.model)
        self._thread = threading.Thread(target=self._loop, name="generator-batcher", daemon=True)
        self._thread.start()
        log.info(
            "transformers engine: %s (%s on %s)", self.config.model, self.config.dtype, self.config.device
        )

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            pending, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for seq in pending:
            seq.fail(EngineStopped("the generator is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout=30)

    # --- prompts ---------------------------------------------------------------------------------
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    # --- requests --------------------------------------------------------------------------------
    def _submit(self, seqs: list[Sequence]) -> None:
        if seqs[0].adapter and (self._adapters is None or seqs[0].adapter not in self._adapters.names):
            raise InvalidRequest(f"adapter_name={seqs[0].adapter!r} is not loaded: push it as a LoRA first")
        limit = getattr(self.model.config, "max_position_embeddings", None)
        for seq in seqs:
            self._check_context(len(seq.prompt_ids), seq.sampling.max_new_tokens, limit)
        with self._cond:
            if self._stopping or self._thread is None:
                raise EngineStopped("the generator is not running")
            if len(self._queue) + len(seqs) > self.config.max_queue:
                raise EngineOverloaded(
                    f"{len(self._queue)} sequences queued, {len(seqs)} more would exceed "
                    f"max_queue={self.config.max_queue}: retry later"
                )
            self._queue.extend(seqs)
            self._emit("queue", len(self._queue))
            self._cond.notify()

    def _units(
        self, prompt_ids: list[int], sampling: Sampling, adapter: str, cancellation: Cancellation
    ) -> list[Sequence]:
        seeds = [
            (sampling.seed + i) % 2**64 if sampling.seed is not None else secrets.randbits(63)
            for i in range(sampling.n)
        ]
        return [Sequence(list(prompt_ids), sampling, seed, adapter, cancellation) for seed in seeds]

    # --- the batcher -----------------------------------------------------------------------------
    def _collect(self) -> list[Sequence]:
        """Waits for a first sequence, then gathers more with the same adapter for up to max_wait_ms."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return []
            batch = [self._queue.popleft()]
            deadline = time.monotonic() + self.config.max_wait_ms / 1000
            while len(batch) < self.config.max_batch_size:
                same = [s for s in self._queue if s.adapter == batch[0].adapter]
                for seq in same[: self.config.max_batch_size - len(batch)]:
                    self._queue.remove(seq)
                    batch.append(seq)
                remaining = deadline - time.monotonic()
                if len(batch) >= self.config.max_batch_size or remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._emit("queue", len(self._queue))
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if not batch:
                return
            live = [s for s in batch if not s.abort_if_cancelled(self._version)]
            if not live:
                continue
            with self._swap_lock:
                try:
                    self._run_batch(live, self._version)
                except Exception as exc:  # a bug or OOM must fail these requests, not the thread
                    log.exception("batch of %d failed", len(live))
                    for seq in live:
                        seq.fail(exc)

    @torch.inference_mode()
    def _run_batch(self, seqs: list[Sequence], version: int) -> None:
        self._emit("batch_size", len(seqs))
        device = self.config.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self._eos_ids)
        width = max(len(s.prompt_ids) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # (B, T) left-padded
        attention = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
        for row, seq in enumerate(seqs):
            input_ids[row, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            attention[row, width - len(seq.prompt_ids) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        from transformers import DynamicCache

        cache = DynamicCache()
        steps = max(s.sampling.max_new_tokens for s in seqs)
        with self._adapter_context(seqs[0].adapter):
            for step in range(steps):
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=attention,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache = out.past_key_values
                tokens, logprobs = sample_rows(out.logits[:, -1, :], seqs)  # (B,), (B,)
                if step == 0:
                    now = time.monotonic()
                    for seq in seqs:
                        self._emit("ttft", now - seq.enqueued_at)
                emitted = 0
                for row, seq in enumerate(seqs):
                    if seq.finished:
                        continue
                    emitted += 1
                    seq.append(int(tokens[row]), float(logprobs[row]), self.tokenizer, self._eos_ids, version)
                self._emit("tokens", emitted)
                if all(s.finished for s in seqs):
                    break
                input_ids = tokens.to(device).unsqueeze(1)  # (B, 1)
                attention = torch.cat([attention, attention.new_ones((len(seqs), 1))], dim=1)
                positions = positions[:, -1:] + 1  # (B, 1)
        for seq in seqs:
            if not seq.finished:
                seq.finish("length", self.tokenizer, version)

    def _adapter_context(self, adapter: str) -> contextlib.AbstractContextManager[Any]:
        if self._adapters is None:
            return contextlib.nullcontext()
        return self._adapters.use(adapter)

    # --- weights ---------------------------------------------------------------------------------
    def weights_for_push(self) -> Mapping[str, torch.Tensor]:
        return self._weights

    def apply_weights(self, staged: StagedWeights) -> SwapResult:
        with self._swap_lock:  # waits for the running batch to finish: swaps land between batches
            previous = self._version
            staged.check_applies_to(previous)
            if staged.kind == "lora":
                assert self._adapters is not None and staged.lora is not None
                self.model = self._adapters.load(staged.lora, staged.tensors)
            elif self._live is None:  # a state dict that is not the model's own tensors: copy into it
                swap_in(self._weights, staged, take_over=False)
            else:
                swap_in(self._live, staged)
                self._weights = {name: tensor.detach() for name, tensor in self._live.items()}
            self._version = staged.version
            self._metadata = dict(staged.metadata)
            self._last_push = datetime.now(timezone.utc)
            return SwapResult(staged.version, previous, len(staged.tensors), self._last_push)

    def _adapter_names(self) -> list[str]:
        return sorted(self._adapters.names) if self._adapters else []


def _model_tensors(model: Any, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The Parameter or buffer behind each state-dict entry, or None when some entry is not simply
    one of them (a state-dict hook reshaped or renamed it): then pushes copy into the state dict."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    live: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        own = named.get(name)
        if own is None or own.shape != tensor.shape or own.data_ptr() != tensor.data_ptr():
            return None
        live[name] = own
    return live
