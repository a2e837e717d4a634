"""The generator over real gRPC (in-process server on a free port), real Redis, the tiny model."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch

from flywheel.common import keys
from flywheel.common import weights as w
from flywheel.common.weight_push import push_messages, push_weights
from flywheel.generator.config import GeneratorConfig
from flywheel.generator.engine import sampling_distribution
from flywheel.generator.server import build_server
from flywheel.v1 import common_pb2, generator_pb2
from tests.conftest import auth
from tests.generator_helpers import PROMPTS, Gen, check_pushes_never_mix_versions, outputs, perturbed


@pytest.fixture
def gen(start_server: Callable[..., Any], server_config: dict[str, Any], tiny_llama_path: str,
        internal_token: str, api_key: str) -> Iterator[Gen]:
    config = GeneratorConfig(model=tiny_llama_path, max_wait_ms=2.0, **server_config)
    with Gen.connect(start_server(build_server, config), internal_token, api_key) as client:
        yield client


# --- generation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [
    {"temperature": 1.0, "max_new_tokens": 6, "seed": 1, "n": 2},
    {"temperature": 0.7, "top_p": 0.8, "top_k": 40, "max_new_tokens": 6, "seed": 2},
    {"temperature": 0.0, "max_new_tokens": 6},
])  # fmt: skip
def test_outputs_carry_tokens_logprobs_version_matching_a_forward_pass(gen: Gen, sampling: dict[str, Any]) -> None:
    response = gen.generate(sampling=sampling, purpose=generator_pb2.REQUEST_PURPOSE_ROLLOUT)
    model = gen.engine.model
    temperature = sampling["temperature"]
    for result in response.results:
        assert len(result.completions) == sampling.get("n", 1)
        for c in result.completions:
            assert len(c.token_ids) == len(c.logprobs) > 0 and c.policy_version == 0
            assert c.finish_reason in (common_pb2.FINISH_REASON_EOS, common_pb2.FINISH_REASON_LENGTH)
            ids = list(result.prompt_token_ids) + list(c.token_ids)
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, len(result.prompt_token_ids) - 1 : -1]  # (N, V)
            if temperature == 0:
                assert logits.argmax(-1).tolist() == list(c.token_ids) and set(c.logprobs) == {0.0}
                continue
            logp = sampling_distribution(logits, temperature, sampling.get("top_k", 0), sampling.get("top_p", 1.0))
            expected = logp.gather(-1, torch.tensor(list(c.token_ids))[:, None])[:, 0]  # (N,)
            assert torch.allclose(expected, torch.tensor(list(c.logprobs)), atol=1e-4)


def test_seeded_sampling_replays_and_stop_strings_cut_text(gen: Gen) -> None:
    sampling = {"temperature": 1.0, "max_new_tokens": 8, "seed": 7}
    assert outputs(gen.generate(sampling=sampling)) == outputs(gen.generate(sampling=sampling))
    first = gen.generate(prompts=PROMPTS[:1], sampling=sampling).results[0].completions[0]
    assert len(first.text) >= 4, first.text  # seeded: a stop string is always taken from it
    stop = first.text[2:4]
    cut = gen.generate(prompts=PROMPTS[:1], sampling={**sampling, "stop": [stop]}).results[0].completions[0]
    assert cut.finish_reason == common_pb2.FINISH_REASON_STOP
    assert cut.text == first.text[: first.text.index(stop)]


def test_completion_log_for_production_not_for_rollouts(gen: Gen, redis_client: Any) -> None:
    prod = gen.generate(purpose=generator_pb2.REQUEST_PURPOSE_PRODUCTION, user_id="u1", session_id="s1",
                        metadata={"app": "test"})
    for result in prod.results:
        for c in result.completions:
            assert c.logged
            record = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.completion_key(c.completion_id)).items()}
            assert record["completion"] == c.text and json.loads(record["token_ids"]) == list(c.token_ids)
            assert json.loads(record["logprobs"]) == pytest.approx(list(c.logprobs))
            assert json.loads(record["prompt_token_ids"]) == list(result.prompt_token_ids)
            assert record["policy_version"] == "0" and record["finish_reason"] in ("eos", "length")
            assert (record["user_id"], record["session_id"], json.loads(record["metadata"])) == ("u1", "s1", {"app": "test"})
            assert record["prompt"] == PROMPTS[int(result.prompt_id)] and record["prompt_messages"] == ""
            assert 0 < redis_client.ttl(keys.completion_key(c.completion_id)) <= 7 * 24 * 3600
    entries = redis_client.xrange(keys.PROMPTS_STREAM)
    assert [e[1][b"prompt"].decode() for e in entries] == PROMPTS
    rollout = gen.generate(purpose=generator_pb2.REQUEST_PURPOSE_ROLLOUT)
    for c in rollout.results[0].completions:
        assert not c.logged and not redis_client.exists(keys.completion_key(c.completion_id))
    asked = gen.generate(purpose=generator_pb2.REQUEST_PURPOSE_ROLLOUT, log_completions=True)
    assert all(c.logged for r in asked.results for c in r.completions)
    assert redis_client.xlen(keys.PROMPTS_STREAM) == 2 * len(PROMPTS)


def test_stream_yields_tokens_then_finish(gen: Gen, redis_client: Any) -> None:
    request = generator_pb2.GenerateStreamRequest(
        prompt=generator_pb2.Prompt(text="the movie was"),
        sampling=generator_pb2.SamplingParams(temperature=0.0, max_new_tokens=5),
    )
    steps = list(gen.stub.GenerateStream(request, metadata=auth(gen.api_key), timeout=60))
    assert steps[-1].finish_reason != 0 and all(s.finish_reason == 0 for s in steps[:-1])
    tokens = [t for s in steps for t in s.token_ids]
    unary = gen.generate(prompts=["the movie was"], sampling={"temperature": 0.0, "max_new_tokens": 5})
    assert tokens == list(unary.results[0].completions[0].token_ids)
    assert "".join(s.text_delta for s in steps) == unary.results[0].completions[0].text
    assert len({s.completion_id for s in steps}) == 1 and redis_client.exists(keys.completion_key(steps[0].completion_id))


BAD_SAMPLING = {
    "n too large": {"n": 10_000},
    "max_new_tokens over limit": {"max_new_tokens": 100_000},
    "top_p zero": {"top_p": 0.0},
    "top_p above one": {"top_p": 1.5},
    "negative temperature": {"temperature": -0.5},
    "nan temperature": {"temperature": float("nan")},
    "empty stop string": {"stop": [""]},
}


def test_bad_generate_input_is_invalid_argument(gen: Gen) -> None:
    for label, sampling in BAD_SAMPLING.items():
        with pytest.raises(grpc.RpcError) as err:
            gen.generate(sampling=sampling)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
    bad_requests = [
        generator_pb2.GenerateRequest(),
        generator_pb2.GenerateRequest(prompts=[generator_pb2.Prompt(text="")]),
        generator_pb2.GenerateRequest(prompts=[generator_pb2.Prompt()]),
        generator_pb2.GenerateRequest(prompts=[generator_pb2.Prompt(token_ids=generator_pb2.TokenIds(ids=[10**6]))]),
        generator_pb2.GenerateRequest(prompts=[generator_pb2.Prompt(text="x")], adapter_name="nope"),
        generator_pb2.GenerateRequest(prompts=[generator_pb2.Prompt(text="x")], metadata={"k": "v" * 10_000}),
    ]
    for request in bad_requests:
        with pytest.raises(grpc.RpcError) as err:
            gen.stub.Generate(request, metadata=auth(gen.api_key), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, str(request)
    stream = generator_pb2.GenerateStreamRequest(
        prompt=generator_pb2.Prompt(text="x"), sampling=generator_pb2.SamplingParams(n=2)
    )
    with pytest.raises(grpc.RpcError) as err:
        list(gen.stub.GenerateStream(stream, metadata=auth(gen.api_key), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- weight pushes --------------------------------------------------------------------------------


def test_full_then_delta_push_change_outputs_and_bump_version(gen: Gen) -> None:
    before = outputs(gen.generate())
    base = gen.live_state()
    v1 = perturbed(base, 1)
    results = push_weights([gen.target], v1, 1, token=gen.token, metadata={"step": "10"})
    assert results[gen.target].version == 1 and results[gen.target].previous_version == 0
    after_full = outputs(gen.generate())
    assert {o[2] for o in after_full} == {1} and [o[0] for o in after_full] != [o[0] for o in before]
    policy = gen.stub.GetPolicy(generator_pb2.GetPolicyRequest(), metadata=auth(gen.api_key))
    assert (policy.policy_version, dict(policy.metadata), policy.engine) == (1, {"step": "10"}, "transformers")
    assert policy.parameter_count == sum(t.numel() for t in base.values()) and policy.last_push_time.seconds > 0
    v2 = {k: t.clone() for k, t in v1.items()}
    v2["lm_head.weight"][:, :8] *= -1  # a small update: only some elements change
    result = push_weights([gen.target], v2, 2, token=gen.token, base=v1, base_version=1)[gen.target]
    assert result.version == 2 and result.tensors_updated == 1
    assert result.bytes_received < v2["lm_head.weight"].numel() * 4
    live = gen.engine.weights_for_push()
    assert all(torch.equal(live[k], v2[k]) for k in v2)
    after_delta = outputs(gen.generate())
    assert {o[2] for o in after_delta} == {2} and [o[0] for o in after_delta] != [o[0] for o in after_full]


def _corruptions(state: dict[str, torch.Tensor]) -> dict[str, tuple[list[tuple[str, Any]], grpc.StatusCode]]:
    def msgs(**kw: Any) -> list[tuple[str, Any]]:
        return list(w.iter_push_messages(state, kw.pop("version", 5), chunk_bytes=4096, **kw))

    cases: dict[str, tuple[list[tuple[str, Any]], grpc.StatusCode]] = {}
    m = msgs()
    m[1][1].data = bytes([m[1][1].data[0] ^ 0xFF]) + m[1][1].data[1:]
    cases["checksum_mismatch"] = (m, grpc.StatusCode.DATA_LOSS)
    m = msgs()
    m[0][1].tensors[0].name = "model.ghost.weight"
    cases["unknown_tensor"] = (m, grpc.StatusCode.INVALID_ARGUMENT)
    m = msgs()
    del m[0][1].tensors[-1]
    cases["missing_tensor"] = (m, grpc.StatusCode.INVALID_ARGUMENT)
    m = msgs()
    m[0][1].tensors[0].shape[0] += 1
    cases["shape_mismatch"] = (m, grpc.StatusCode.INVALID_ARGUMENT)
    m = msgs()
    m[0][1].tensors[0].dtype = common_pb2.TENSOR_DTYPE_BFLOAT16
    cases["dtype_mismatch"] = (m, grpc.StatusCode.INVALID_ARGUMENT)
    nan_state = {k: v.clone() for k, v in state.items()}
    next(iter(nan_state.values())).view(-1)[3] = float("inf")
    cases["non_finite"] = (list(w.iter_push_messages(nan_state, 5)), grpc.StatusCode.INVALID_ARGUMENT)
    cases["stale_version"] = (msgs(version=0), grpc.StatusCode.FAILED_PRECONDITION)
    cases["base_mismatch"] = (list(w.iter_push_messages(nan_state, 5, base=state, base_version=3)),
                              grpc.StatusCode.FAILED_PRECONDITION)
    cases["truncated"] = (msgs()[:-1], grpc.StatusCode.DATA_LOSS)
    m = msgs()
    m[1], m[2] = m[2], m[1]
    cases["bad_order"] = (m, grpc.StatusCode.INVALID_ARGUMENT)
    m = msgs()
    m[-2][1].data += b"extra"
    cases["too_large"] = (m, grpc.StatusCode.RESOURCE_EXHAUSTED)
    uri = w.iter_uri_push_messages("/nonexistent/model.safetensors", 5)
    cases["bad_uri"] = (list(uri), grpc.StatusCode.INVALID_ARGUMENT)
    return cases


def test_every_bad_push_is_rejected_and_outputs_stay_bit_identical(gen: Gen) -> None:
    reference = outputs(gen.generate(sampling={"temperature": 0.8, "seed": 3, "max_new_tokens": 6}))
    new = perturbed(gen.live_state(), 9)
    for reason, (messages, code) in _corruptions(new).items():
        with pytest.raises(grpc.RpcError) as err:
            push_messages(gen.target, iter(messages), token=gen.token)
        assert err.value.code() == code, reason
        assert err.value.details().startswith(reason), err.value.details()
        assert gen.version() == 0
        assert outputs(gen.generate(sampling={"temperature": 0.8, "seed": 3, "max_new_tokens": 6})) == reference
    for secret, code in (("", grpc.StatusCode.UNAUTHENTICATED), (gen.api_key, grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.RpcError) as err:
            push_messages(gen.target, w.iter_push_messages(new, 5), token=secret)
        assert err.value.code() == code
    failures = gen.server.registry.get_sample_value(
        "flywheel_generator_push_failures_total", {"reason": "checksum_mismatch"}
    )
    assert failures == 1.0 and gen.version() == 0


def test_uri_push_from_safetensors(gen: Gen, tmp_path: Any) -> None:
    from safetensors.torch import save_file

    new = perturbed(gen.live_state(), 4)
    save_file(new, str(tmp_path / "model.safetensors"))
    result = push_messages(gen.target, w.iter_uri_push_messages(f"file://{tmp_path}", 3, state=new), token=gen.token)
    assert result.version == 3 and all(torch.equal(gen.engine.weights_for_push()[k], new[k]) for k in new)


def test_concurrent_generation_during_pushes_never_mixes_versions(gen: Gen) -> None:
    check_pushes_never_mix_versions(gen, join_timeout=120, require_overlap=False)


def test_lora_push_loads_an_adapter_used_by_name(gen: Gen, tiny_llama_path: str) -> None:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_path), config)
    adapter = {k: v.detach().clone() * 50 for k, v in get_peft_model_state_dict(peft_model).items()}
    spec = common_pb2.LoraAdapterSpec(adapter_name="style", adapter_config_json=json.dumps(config.to_dict(), default=list))
    base_before = outputs(gen.generate())
    result = push_messages(gen.target, w.iter_push_messages(adapter, 1, kind=w.LORA, lora=spec), token=gen.token)
    assert result.version == 1
    assert list(gen.stub.GetPolicy(generator_pb2.GetPolicyRequest(), metadata=auth(gen.api_key)).adapter_names) == ["style"]
    with_adapter = outputs(gen.generate(adapter_name="style"))
    assert [o[0] for o in with_adapter] != [o[0] for o in base_before]
    assert [o[0] for o in outputs(gen.generate())] == [o[0] for o in base_before]  # base unaffected
    bad = {k: v for k, v in list(adapter.items())[1:]}
    spec2 = common_pb2.LoraAdapterSpec(adapter_name="broken", adapter_config_json=spec.adapter_config_json)
    with pytest.raises(grpc.RpcError) as err:
        push_messages(gen.target, w.iter_push_messages(bad, 2, kind=w.LORA, lora=spec2), token=gen.token)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and gen.version() == 1
