"""The sampling distribution every engine reports logprobs under, and config validation."""

from __future__ import annotations

import math

import pytest
import torch

from flywheel.common.config import ConfigError
from flywheel.generator.config import GeneratorConfig
from flywheel.generator.engine import sampling_distribution


def test_temperature_only_is_scaled_log_softmax() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    got = sampling_distribution(logits, 0.5, 0, 1.0)
    assert torch.allclose(got, torch.log_softmax(logits / 0.5, dim=-1))


def test_top_k_then_top_p_renormalise() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top_k = sampling_distribution(logits, 1.0, 2, 1.0).exp()
    assert torch.allclose(top_k, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    top_p = sampling_distribution(logits, 1.0, 0, 0.7).exp()  # 0.5 + 0.3 reach 0.7: keep two
    assert torch.allclose(top_p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    first_only = sampling_distribution(logits, 1.0, 0, 0.4).exp()
    assert torch.allclose(first_only, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert math.isclose(float(sampling_distribution(logits, 1.0, 3, 0.9).exp().sum()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("bad", [
    {"engine": "tgi"}, {"dtype": "int8"}, {"max_batch_size": 0}, {"max_wait_ms": -1},
    {"max_n": 0}, {"default_max_new_tokens": 10_000}, {"max_push_bytes": 0}, {"device": "tpu"},
    {"gpu_memory_utilization": 1.5},
])  # fmt: skip
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        GeneratorConfig(**bad)  # type: ignore[arg-type]
