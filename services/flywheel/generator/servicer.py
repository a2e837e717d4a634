"""GeneratorService over gRPC: proto <-> engine types, validation, exceptions -> status codes.

Deadlines and cancellation: every RPC registers a callback that cancels its sequences, so the
engine stops decoding for callers that are gone (their completions end 'aborted').
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any, NoReturn

import grpc

from flywheel.common.weight_channel import receive_push
from flywheel.common.weights import WeightPushError, WeightReceiver
from flywheel.generator.completion_log import CompletionLog, LoggedCompletion
from flywheel.generator.config import GeneratorConfig
from flywheel.generator.engine import (
    Cancellation,
    Completion,
    Engine,
    EngineOverloaded,
    EngineStopped,
    InvalidRequest,
    Sampling,
)
from flywheel.generator.metrics import GeneratorMetrics
from flywheel.v1 import common_pb2, generator_pb2, generator_pb2_grpc

log = logging.getLogger(__name__)

FINISH = {
    "eos": common_pb2.FINISH_REASON_EOS,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "stop": common_pb2.FINISH_REASON_STOP,
    "aborted": common_pb2.FINISH_REASON_ABORTED,
}
ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
ENGINE_ERRORS = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    EngineOverloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineStopped: grpc.StatusCode.UNAVAILABLE,
}


class BadRequest(ValueError):
    """Invalid client input; the message says what to change."""


class _Prompt:
    def __init__(self, prompt_id: str, ids: list[int], text: str, chat: list[dict[str, str]] | None) -> None:
        self.prompt_id, self.ids, self.text, self.chat = prompt_id, ids, text, chat


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self, config: GeneratorConfig, engine: Engine, metrics: GeneratorMetrics) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.completion_log: CompletionLog | None = None  # set by the server's load hook

    # --- Generate --------------------------------------------------------------------------------
    def Generate(self, request: generator_pb2.GenerateRequest, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        try:
            sampling = self._sampling(request.sampling, streaming=False)
            if not request.prompts:
                raise BadRequest("prompts is empty: send at least one prompt")
            if len(request.prompts) > self.config.max_prompts:
                raise BadRequest(f"{len(request.prompts)} prompts: at most max_prompts={self.config.max_prompts}")
            self._check_metadata(request.metadata)
            prompts = [self._prompt(p, i) for i, p in enumerate(request.prompts)]
        except BadRequest as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        cancellation = Cancellation()
        context.add_callback(cancellation.cancel)
        results = self._run(context, lambda: self.engine.generate(
            [p.ids for p in prompts], sampling, request.adapter_name, cancellation
        ))  # fmt: skip
        log_it = _should_log(request.purpose, request.log_completions)
        response = generator_pb2.GenerateResponse()
        to_log: list[list[LoggedCompletion]] = []
        for prompt, completions in zip(prompts, results, strict=True):
            entry = response.results.add(prompt_id=prompt.prompt_id, prompt_token_ids=prompt.ids)
            logged = [self._logged(prompt, c, request) for c in completions if c.finish_reason != "aborted"]
            to_log.append(logged if log_it else [])
            for completion, record in zip(completions, _pad(logged, completions), strict=True):
                entry.completions.append(_completion_pb(completion, record))
        self._write_log(to_log, response)
        self.metrics.latency.labels("Generate").observe(time.perf_counter() - start)
        return response

    def GenerateStream(self, request: generator_pb2.GenerateStreamRequest, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        try:
            sampling = self._sampling(request.sampling, streaming=True)
            self._check_metadata(request.metadata)
            if not request.HasField("prompt"):
                raise BadRequest("prompt is missing")
            prompt = self._prompt(request.prompt, 0)
        except BadRequest as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        cancellation = Cancellation()
        context.add_callback(cancellation.cancel)
        completion_id = uuid.uuid4().hex
        tokens: list[int] = []
        logprobs: list[float] = []
        text: list[str] = []
        deltas = self._run(context, lambda: self.engine.stream(prompt.ids, sampling, request.adapter_name, cancellation))
        for delta in self._guard(context, deltas):
            tokens += delta.token_ids
            logprobs += delta.logprobs
            text.append(delta.text_delta)
            yield generator_pb2.GenerateStreamResponse(
                completion_id=completion_id,
                text_delta=delta.text_delta,
                token_ids=delta.token_ids,
                logprobs=delta.logprobs,
                finish_reason=FINISH.get(delta.finish_reason, 0),
                policy_version=delta.policy_version,
            )
            if delta.finish_reason:
                self.metrics.completions.labels(delta.finish_reason).inc()
                if delta.finish_reason != "aborted" and _should_log(request.purpose, False):
                    done = Completion(tokens, logprobs, "".join(text), delta.finish_reason, delta.policy_version)
                    record = self._logged(prompt, done, request, completion_id)
                    self._write_log([[record]], None)
        self.metrics.latency.labels("GenerateStream").observe(time.perf_counter() - start)

    # --- PushWeights / GetPolicy -------------------------------------------------------------------
    def PushWeights(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        receiver = WeightReceiver(
            self.engine.weights_for_push(),
            self.engine.policy_version,
            self.config.max_push_bytes,
            side_channel=True,
        )
        try:  # bytes on the stream, or over the TCP side channel the manifest asks for
            staged = receive_push(request_iterator, context, receiver, bind_host=self.config.host)
            swap = self.engine.apply_weights(staged)
        except WeightPushError as exc:
            self.metrics.push_failures.labels(exc.reason).inc()
            self.metrics.push_bytes.inc(receiver.bytes_received)
            log.warning("weight push rejected (%s): %s", exc.reason, exc)
            _abort(context, grpc.StatusCode[exc.status], f"{exc.reason}: {exc}")
        seconds = time.monotonic() - staged.started_at
        self.metrics.push_bytes.inc(staged.bytes_received)
        self.metrics.push_seconds.observe(seconds)
        self.metrics.policy_version.set(swap.version)
        log.info(
            "policy version %d -> %d (%s push, %d tensors, %d bytes, %.2fs, from %s)",
            swap.previous_version, swap.version, staged.kind, swap.tensors_updated,
            staged.bytes_received, seconds, staged.pusher or "?",
        )  # fmt: skip
        result = common_pb2.WeightPushResult(
            version=swap.version,
            previous_version=swap.previous_version,
            bytes_received=staged.bytes_received,
            tensors_updated=swap.tensors_updated,
            seconds=seconds,
        )
        result.swapped_at.FromDatetime(swap.swapped_at)
        return generator_pb2.GeneratorServicePushWeightsResponse(result=result)

    def GetPolicy(self, request: generator_pb2.GetPolicyRequest, context: grpc.ServicerContext) -> Any:
        info = self.engine.policy()
        response = generator_pb2.GetPolicyResponse(
            policy_version=info.version,
            model_id=info.model_id,
            engine=info.engine,
            dtype=info.dtype,
            parameter_count=info.parameter_count,
            adapter_names=info.adapter_names,
            metadata=info.metadata,
        )
        if info.last_push_time is not None:
            response.last_push_time.FromDatetime(info.last_push_time)
        return response

    # --- helpers ---------------------------------------------------------------------------------
    def _run(self, context: grpc.ServicerContext, call: Any) -> Any:
        try:
            return call()
        except tuple(ENGINE_ERRORS) as exc:
            _abort(context, ENGINE_ERRORS[type(exc)], str(exc))

    def _guard(self, context: grpc.ServicerContext, deltas: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from deltas
        except tuple(ENGINE_ERRORS) as exc:
            _abort(context, ENGINE_ERRORS[type(exc)], str(exc))

    def _sampling(self, params: generator_pb2.SamplingParams, streaming: bool) -> Sampling:
        n = params.n or 1
        if n > self.config.max_n:
            raise BadRequest(f"sampling.n={n}: at most max_n={self.config.max_n}")
        if streaming and n != 1:
            raise BadRequest(f"sampling.n={n}: GenerateStream streams one completion, use n=1")
        temperature = params.temperature if params.HasField("temperature") else 1.0
        if not math.isfinite(temperature) or temperature < 0:
            raise BadRequest(f"sampling.temperature={temperature}: use 0 (greedy) or a positive number")
        top_p = params.top_p if params.HasField("top_p") else 1.0
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise BadRequest(f"sampling.top_p={top_p}: must be in (0, 1]")
        max_new = params.max_new_tokens or self.config.default_max_new_tokens
        if max_new > self.config.max_new_tokens_limit:
            raise BadRequest(
                f"sampling.max_new_tokens={max_new}: at most {self.config.max_new_tokens_limit} on this server"
            )
        if len(params.stop) > MAX_STOP_STRINGS or any(not s for s in params.stop):
            raise BadRequest(f"sampling.stop: up to {MAX_STOP_STRINGS} non-empty strings")
        return Sampling(
            n=n,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(params.top_k),
            max_new_tokens=int(max_new),
            stop=tuple(params.stop),
            seed=int(params.seed) if params.HasField("seed") else None,
        )

    def _prompt(self, prompt: generator_pb2.Prompt, index: int) -> _Prompt:
        which = prompt.WhichOneof("input")
        where = f"prompts[{index}]"
        if which == "text":
            if not prompt.text:
                raise BadRequest(f"{where}.text is empty")
            return _Prompt(prompt.prompt_id, self.engine.tokenize(text=prompt.text), prompt.text, None)
        if which == "chat":
            chat = [{"role": m.role, "content": m.content} for m in prompt.chat.messages]
            if not chat or any(m["role"] not in ROLES for m in chat):
                raise BadRequest(f"{where}.chat: send messages with roles {ROLES}")
            ids = self.engine.tokenize(chat=chat)
            return _Prompt(prompt.prompt_id, ids, self.engine.decode(ids), chat)
        if which == "token_ids":
            ids = list(prompt.token_ids.ids)
            vocab = self.engine.vocab_size()
            if not ids or any(not 0 <= i < vocab for i in ids):
                raise BadRequest(f"{where}.token_ids: send a non-empty list of ids in [0, {vocab})")
            return _Prompt(prompt.prompt_id, ids, self.engine.decode(ids), None)
        raise BadRequest(f"{where} is empty: set text, chat or token_ids")

    def _check_metadata(self, metadata: Any) -> None:
        size = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
        if size > self.config.max_metadata_bytes:
            raise BadRequest(f"metadata is {size} bytes: at most max_metadata_bytes={self.config.max_metadata_bytes}")

    def _logged(self, prompt: _Prompt, c: Completion, request: Any, completion_id: str = "") -> LoggedCompletion:
        return LoggedCompletion(
            completion_id=completion_id or uuid.uuid4().hex,
            prompt=prompt.text,
            prompt_messages=prompt.chat,
            completion=c.text,
            prompt_token_ids=prompt.ids,
            token_ids=c.token_ids,
            logprobs=c.logprobs,
            policy_version=c.policy_version,
            finish_reason=c.finish_reason,
            adapter_name=request.adapter_name,
            user_id=request.user_id,
            session_id=request.session_id,
            metadata=dict(request.metadata),
        )

    def _write_log(self, to_log: list[list[LoggedCompletion]], response: Any) -> None:
        """Writes the log; on failure the completions are still returned, marked logged=false."""
        if not any(to_log):
            return
        ok = False
        if self.completion_log is not None:
            try:
                self.completion_log.write(to_log)
                ok = True
            except Exception:  # Redis down must not take production generation down with it
                self.metrics.log_failures.inc()
                log.exception("completion log write failed")
        if response is None or not ok:
            return
        ids = {c.completion_id for group in to_log for c in group}
        for entry in response.results:
            for completion in entry.completions:
                completion.logged = completion.completion_id in ids


def _should_log(purpose: int, log_completions: bool) -> bool:
    production = purpose in (generator_pb2.REQUEST_PURPOSE_UNSPECIFIED, generator_pb2.REQUEST_PURPOSE_PRODUCTION)
    return production or log_completions


def _pad(logged: list[LoggedCompletion], completions: list[Completion]) -> list[LoggedCompletion | None]:
    """Pairs each completion with its log record (aborted ones have none)."""
    records = iter(logged)
    return [next(records) if c.finish_reason != "aborted" else None for c in completions]


def _completion_pb(c: Completion, record: LoggedCompletion | None) -> generator_pb2.Completion:
    return generator_pb2.Completion(
        completion_id=record.completion_id if record else uuid.uuid4().hex,
        text=c.text,
        token_ids=c.token_ids,
        logprobs=c.logprobs,
        finish_reason=FINISH[c.finish_reason],
        policy_version=c.policy_version,
    )


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")
