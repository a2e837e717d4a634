#!/usr/bin/env bash
# Creates .venv with the server and dev extras at the pinned versions (constraints.txt).
# Idempotent: re-running only installs what changed. torch resolves to the 2.13.0 CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.flywheel-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
python -m pip install -q --upgrade pip
# torch first and alone, pinned, so nothing later can pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -c constraints.txt -e ".[server,dev]"
echo "$want" > "$stamp"
echo "setup: .venv ready ($(python -c 'import torch; print("torch", torch.__version__)'))"
