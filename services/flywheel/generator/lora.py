"""LoRA adapters for the transformers engine, through PEFT: loaded at run time from a LoRA push,
selected per batch by adapter name; the base policy runs with adapters disabled."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from flywheel.common.weights import WeightPushError
from flywheel.v1 import common_pb2


class LoraAdapters:
    """Adapters beside the base weights. The PEFT wrapper is created on the first push; the base
    modules (and so the live base tensors) stay the same objects."""

    def __init__(self, model: Any) -> None:
        self.base = model
        self.peft: Any = None
        self._configs: dict[str, str] = {}

    @property
    def names(self) -> set[str]:
        return set(self._configs)

    @contextlib.contextmanager
    def use(self, adapter: str) -> Iterator[None]:
        if self.peft is None:
            yield
        elif not adapter:
            with self.peft.disable_adapter():
                yield
        else:
            self.peft.set_adapter(adapter)
            yield

    def load(self, spec: common_pb2.LoraAdapterSpec, tensors: Mapping[str, torch.Tensor]) -> Any:
        """Adds (or updates in place) adapter ``spec.adapter_name``; returns the model to run.
        Validates names and shapes against the adapter PEFT builds before any value is loaded,
        so a bad push leaves every adapter as it was."""
        from peft import PeftConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

        name, config_json = spec.adapter_name, spec.adapter_config_json
        if name in self._configs:
            if json.loads(self._configs[name]) != json.loads(config_json):
                raise WeightPushError(
                    "bad_adapter", f"adapter {name!r} exists with another config: push it under a new name"
                )
            self._check_and_copy(name, tensors)
            return self.peft
        try:
            config = PeftConfig.from_peft_type(**json.loads(config_json))
        except (TypeError, ValueError, KeyError) as exc:
            raise WeightPushError("bad_adapter", f"adapter_config_json is not a PEFT config: {exc}") from exc
        if str(getattr(config, "peft_type", "")).upper().rsplit(".", 1)[-1] != "LORA":
            raise WeightPushError("bad_adapter", f"adapter {name!r}: only LoRA adapters are supported")
        created = self.peft is None
        try:
            if created:
                self.peft = PeftModel(self.base, config, adapter_name=name)
            else:
                self.peft.add_adapter(name, config)
            expected = get_peft_model_state_dict(self.peft, adapter_name=name)
            _check_keys(name, expected, tensors)
        except (WeightPushError, ValueError, TypeError) as exc:
            self._drop(name, created)
            if isinstance(exc, WeightPushError):
                raise
            raise WeightPushError("bad_adapter", f"adapter {name!r}: {exc}") from exc
        set_peft_model_state_dict(self.peft, dict(tensors), adapter_name=name)
        self.peft.eval()
        self._configs[name] = config_json
        return self.peft

    def _check_and_copy(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict
        from peft.utils import get_peft_model_state_dict

        _check_keys(name, get_peft_model_state_dict(self.peft, adapter_name=name), tensors)
        set_peft_model_state_dict(self.peft, dict(tensors), adapter_name=name)

    def _drop(self, name: str, created: bool) -> None:
        if self.peft is None:
            return
        if created:
            self.base = self.peft.unload()  # back to the plain model, no LoRA layers left behind
            self.peft = None
        elif name in self.peft.peft_config:
            self.peft.delete_adapter(name)


def _check_keys(name: str, expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(expected.keys() - got.keys())
    unknown = sorted(got.keys() - expected.keys())
    if missing or unknown:
        raise WeightPushError(
            "bad_adapter",
            f"adapter {name!r}: tensors do not match its config (missing {missing[:2]}, unknown {unknown[:2]})",
        )
    for key, tensor in got.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise WeightPushError(
                "bad_adapter", f"adapter {name!r}: {key} has shape {list(tensor.shape)}, expected {list(expected[key].shape)}"
            )
