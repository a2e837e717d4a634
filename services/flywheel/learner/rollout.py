"""Rollouts over gRPC: prompts -> generator ``Generate`` (n samples, ROLLOUT purpose) -> reward ``Score``.

Every RPC has a deadline and is retried with capped exponential backoff while the service is
unavailable (tenacity); each retry logs one clear line and reports the wait through ``on_wait`` so
the learner's status says WAITING and why. Backoff sleeps on ``stop`` so shutdown never hangs.
Errors that retrying cannot fix (bad token, invalid request) are raised at once.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential

from flywheel.common.server import channel_options
from flywheel.learner.config import LearnerConfig
from flywheel.learner.prompts import PromptItem
from flywheel.learner.targets import resolve_targets
from flywheel.v1 import common_pb2, generator_pb2, generator_pb2_grpc, reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}


class Stopped(Exception):
    """The learner is shutting down; the rollout was abandoned."""


class IncompleteRollout(Exception):
    """The generator aborted some completions (e.g. it was shutting down): retry the batch."""


@dataclass
class GeneratedBatch:
    """Completions of one Generate call, flattened: ``n`` adjacent rows per prompt."""

    prompts: list[PromptItem]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completion_texts: list[str]
    behaviour_logprobs: list[list[float]]
    truncated: list[bool]
    policy_versions: list[int]


def _retryable(exc: BaseException) -> bool:
    return (isinstance(exc, grpc.RpcError) and exc.code() in RETRYABLE) or isinstance(exc, IncompleteRollout)


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return repr(exc)


class GrpcRollouts:
    """Client of the generator replicas and the reward service for the learner."""

    def __init__(
        self,
        config: LearnerConfig,
        stop: threading.Event,
        on_wait: Callable[[str], None] = lambda _reason: None,
    ) -> None:
        self.config = config
        self.stop = stop
        self.on_wait = on_wait
        self._metadata = [("authorization", f"Bearer {config.internal_token}")]
        self._options = channel_options(config.max_message_bytes)
        self._channels: dict[str, grpc.Channel] = {}
        self._round_robin = itertools.count()
        self.retries = 0

    def _channel(self, target: str) -> grpc.Channel:
        if target not in self._channels:
            self._channels[target] = grpc.insecure_channel(target, options=self._options)
        return self._channels[target]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Runs ``fn`` until it succeeds, retrying retryable failures with capped backoff."""

        def before_sleep(state: RetryCallState) -> None:
            self.retries += 1
            wait = state.next_action.sleep if state.next_action else 0.0
            reason = f"{what} unavailable ({_describe(state.outcome.exception() if state.outcome else None)})"
            log.warning("%s; attempt %d failed, retrying in %.1fs", reason, state.attempt_number, wait)
            self.on_wait(reason)

        def sleep(seconds: float) -> None:
            if self.stop.wait(seconds):
                raise Stopped(f"stopped while waiting for the {what}")

        retrying = Retrying(
            retry=retry_if_exception(_retryable),
            wait=wait_exponential(multiplier=0.5, min=0.2, max=self.config.rpc_max_backoff),
            before_sleep=before_sleep,
            sleep=sleep,
            reraise=True,
        )
        return retrying(fn)

    # --- generate --------------------------------------------------------------------------
    def generate(self, prompts: Sequence[PromptItem], seed: int) -> GeneratedBatch:
        cfg = self.config
        request = generator_pb2.GenerateRequest(
            prompts=[p.to_proto() for p in prompts],
            sampling=generator_pb2.SamplingParams(
                n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens, seed=seed,
            ),
            purpose=generator_pb2.REQUEST_PURPOSE_ROLLOUT,
        )

        def attempt() -> generator_pb2.GenerateResponse:
            targets = resolve_targets(cfg.generator_targets)
            target = targets[next(self._round_robin) % len(targets)]
            stub = generator_pb2_grpc.GeneratorServiceStub(self._channel(target))
            response = stub.Generate(request, timeout=cfg.rpc_timeout, metadata=self._metadata)
            if any(c.finish_reason == common_pb2.FINISH_REASON_ABORTED
                   for r in response.results for c in r.completions):
                raise IncompleteRollout(f"generator {target} aborted completions")
            return response

        response = self._call(f"generator {','.join(cfg.generator_targets)}", attempt)
        return _flatten(list(prompts), response, cfg.samples_per_prompt)

    # --- score -----------------------------------------------------------------------------
    def score(self, prompt_texts: Sequence[str], completion_texts: Sequence[str]) -> tuple[list[float], int]:
        """Rewards of the samples, and the reward-model version that scored them."""
        cfg = self.config
        request = reward_pb2.ScoreRequest(
            samples=[
                reward_pb2.ScoreSample(sample_id=str(i), prompt=p, completion=c)
                for i, (p, c) in enumerate(zip(prompt_texts, completion_texts, strict=True))
            ],
            scorer=cfg.reward_scorer,
        )

        def attempt() -> reward_pb2.ScoreResponse:
            stub = reward_pb2_grpc.RewardServiceStub(self._channel(cfg.reward_target))
            return stub.Score(request, timeout=cfg.rpc_timeout, metadata=self._metadata)

        response = self._call(f"reward service {cfg.reward_target}", attempt)
        by_id = {s.sample_id: s.reward for s in response.scores}
        missing = [str(i) for i in range(len(prompt_texts)) if str(i) not in by_id]
        if missing:
            raise RuntimeError(f"reward service returned no score for samples {missing[:5]}")
        return [float(by_id[str(i)]) for i in range(len(prompt_texts))], int(response.model_version)


def _flatten(prompts: list[PromptItem], response: Any, n: int) -> GeneratedBatch:
    out = GeneratedBatch(prompts, [], [], [], [], [], [])
    if len(response.results) != len(prompts):
        raise RuntimeError(f"generator answered {len(response.results)} prompts, asked {len(prompts)}")
    for result in response.results:
        if len(result.completions) != n:
            raise RuntimeError(f"generator returned {len(result.completions)} completions, asked n={n}")
        for completion in result.completions:
            out.prompt_ids.append(list(result.prompt_token_ids))
            out.completion_ids.append(list(completion.token_ids))
            out.completion_texts.append(completion.text)
            out.behaviour_logprobs.append(list(completion.logprobs))
            # EOS (the token is included in token_ids) ends a completion; LENGTH truncates it.
            out.truncated.append(completion.finish_reason == common_pb2.FINISH_REASON_LENGTH)
            out.policy_versions.append(int(completion.policy_version))
    return out
