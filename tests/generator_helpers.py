"""A test client of one generator server and the weight-push checks shared by the generator tests
(tests/integration, run in .venv) and the vLLM engine tests (tests/vllm, run in .venv-vllm).

A plain module, not a conftest: it imports only what both virtualenvs have (torch, grpc, flywheel).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import grpc
import torch

from flywheel.common.weight_push import push_weights
from flywheel.v1 import generator_pb2, generator_pb2_grpc
from tests.conftest import auth

PROMPTS = ["the movie was", "my day felt", "the food"]
GREEDY = {"temperature": 0.0, "max_new_tokens": 6}

Output = tuple[list[int], list[float], int]  # (token ids, logprobs, policy version) of one completion


@dataclasses.dataclass
class Gen:
    """A client of one in-process generator server; ``Gen.connect`` opens its channel, ``close``
    (or leaving a ``with`` block) closes it. ``defaults`` are the request fields (``prompts``,
    ``sampling``, ``purpose``, ...) that ``generate`` uses unless the call gives them."""

    server: Any
    channel: grpc.Channel
    stub: generator_pb2_grpc.GeneratorServiceStub
    target: str
    token: str
    api_key: str
    model_path: str = ""
    timeout: float = 60.0
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def connect(cls, server: Any, token: str, api_key: str, **options: Any) -> Gen:
        target = f"127.0.0.1:{server.port}"
        channel = grpc.insecure_channel(target)
        return cls(server, channel, generator_pb2_grpc.GeneratorServiceStub(channel), target, token, api_key,
                   **options)  # fmt: skip

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Gen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def engine(self) -> Any:
        return self.server.generator_servicer.engine

    def generate(self, **kw: Any) -> generator_pb2.GenerateResponse:
        kw = {**self.defaults, **kw}
        prompts = kw.pop("prompts", PROMPTS)
        sampling = kw.pop("sampling", GREEDY)
        request = generator_pb2.GenerateRequest(
            prompts=[generator_pb2.Prompt(prompt_id=str(i), text=t) for i, t in enumerate(prompts)],
            sampling=generator_pb2.SamplingParams(**sampling),
            **kw,
        )
        return self.stub.Generate(request, metadata=auth(self.api_key), timeout=self.timeout)

    def outputs(self, **kw: Any) -> list[Output]:
        return outputs(self.generate(**kw))

    def version(self) -> int:
        return self.stub.GetPolicy(
            generator_pb2.GetPolicyRequest(), metadata=auth(self.api_key)
        ).policy_version

    def live_state(self) -> dict[str, torch.Tensor]:
        """A copy of the weights the engine says it serves."""
        return {k: v.detach().clone() for k, v in self.engine.weights_for_push().items()}


def outputs(response: generator_pb2.GenerateResponse) -> list[Output]:
    return [
        (list(c.token_ids), list(c.logprobs), c.policy_version)
        for r in response.results
        for c in r.completions
    ]


def tokens(response: generator_pb2.GenerateResponse) -> list[list[int]]:
    return [o[0] for o in outputs(response)]


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """New weights whose greedy output differs clearly from others' (lm_head scaled: big margins)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}
    out["lm_head.weight"] = out["lm_head.weight"] * 20
    return out


def check_pushes_never_mix_versions(gen: Gen, *, join_timeout: float, require_overlap: bool) -> None:
    """Four callers generate (greedy) while six full pushes cycle through three distinguishable
    states: every completion's tokens are those of the state its policy version names. With
    ``require_overlap`` the completions must also span more than one version (pushes landed while
    generating)."""
    base = gen.live_state()
    states = {s: perturbed(base, s) for s in (1, 2, 3)}
    v0 = gen.version()
    state_of: dict[int, int] = {v0: 0}
    refs: dict[int, list[list[int]]] = {0: tokens(gen.generate())}
    for s, state in states.items():  # reference greedy output of each state, served alone
        push_weights([gen.target], state, v0 + s, token=gen.token)
        refs[s] = tokens(gen.generate())
        state_of[v0 + s] = s
    assert len({tuple(map(tuple, r)) for r in refs.values()}) == 4, "states must be distinguishable"
    seen: list[list[Output]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            while not stop.is_set() or len(seen) < 8:
                seen.append(outputs(gen.generate()))
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for step in range(6):  # cycle through the states again under load
            version = v0 + 4 + step
            result = push_weights([gen.target], states[step % 3 + 1], version, token=gen.token)[gen.target]
            assert not isinstance(result, Exception), result
            assert result.version == version
            state_of[version] = step % 3 + 1
    finally:  # a failed push must fail the test, not leave the callers looping
        stop.set()
        for t in threads:
            t.join(timeout=join_timeout)
    assert not errors
    if require_overlap:
        assert len({o[2] for outs in seen for o in outs}) > 1, "pushes landed while generating"
    for outs in seen:
        for index, (toks, _logprobs, version) in enumerate(outs):
            assert toks == refs[state_of[version]][index], f"version {version} output made by other weights"
