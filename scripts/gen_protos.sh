#!/usr/bin/env bash
# Regenerates the Python code for protos/flywheel/v1/*.proto into services/flywheel/v1/.
# The only way generated code is made; never edit the output by hand.
# --check: regenerate into a temp dir and fail if it differs from what is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=services
if [[ "${1:-}" == "--check" ]]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out/flywheel/v1"
python -m grpc_tools.protoc -I protos \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/flywheel/v1/*.proto
# Keep the package importable; generated code imports flywheel.v1.common_pb2 absolutely.
printf '"""Generated from protos/flywheel/v1 by scripts/gen_protos.sh. Do not edit."""\n' \
  > "$out/flywheel/v1/__init__.py"
if [[ "${1:-}" == "--check" ]]; then
  if ! diff -r -x __pycache__ "$out/flywheel/v1" services/flywheel/v1; then
    echo "generated code is out of date: run scripts/gen_protos.sh and commit the result" >&2
    exit 1
  fi
  echo "generated code matches protos/"
fi
