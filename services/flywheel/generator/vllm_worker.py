"""The vLLM worker extension that loads pushed weights in place (``worker_extension_cls``).

vLLM mixes this class into each of its workers (in the engine's process, or in worker processes
in multi-process mode) and the engine reaches it with ``collective_rpc("flywheel_load_weights")``.
Imported inside those workers, so nothing heavy at the top besides torch; vLLM itself is already
loaded there. Method names carry a ``flywheel_`` prefix: vLLM refuses an extension whose
attribute names clash with the worker's own (it has an ``update_weights`` of its own).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

# Partial reloads (a delta touching some decoder layers) make vLLM warn, per untouched layer, that
# it "failed to load" weights it restores as they were; that is what we want, so quiet it.
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload"


class WeightUpdateExtension:
    """Worker-side half of a weight push. ``self`` is a vLLM worker (it has ``reload_weights``)."""

    def flywheel_load_weights(self, payload: bytes) -> int:
        """Loads a safetensors-serialised ``{checkpoint name: tensor}`` into the running model in
        place, through the worker's ``reload_weights`` (vLLM maps checkpoint names onto its fused
        layers and re-runs each layer's post-load processing, e.g. CPU GEMM weight packing).
        Bytes travel the same way in-process and across processes (raw tensors would arrive as
        lists there). Every layer the payload touches must be complete in it: vLLM rebuilds a
        partially loaded layer from uninitialised memory. Returns the number of tensors loaded."""
        from safetensors.torch import load as load_safetensors

        tensors: dict[str, torch.Tensor] = load_safetensors(payload)
        worker: Any = self
        quiet = logging.getLogger(_RELOAD_LOGGER)
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            if _has_inplace_reload(worker):
                worker.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
            else:  # vLLM before in-place reload: the model's own loader (right for unquantized GPU models)
                worker.model_runner.model.load_weights(weights=iter(tensors.items()))
        finally:
            quiet.setLevel(level)
        return len(tensors)


def _has_inplace_reload(worker: Any) -> bool:
    runner_reload = getattr(getattr(worker, "model_runner", None), "reload_weights", None)
    return runner_reload is not None and "weights_iterator" in inspect.signature(runner_reload).parameters
