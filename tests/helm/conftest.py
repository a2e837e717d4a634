"""Shared setup for the deployment tests: the `helm` marker and the helm binary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL_HINT = "run scripts/install_helm_tools.sh (installs .tools/bin/helm) or set $HELM"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "helm: Helm chart, image and compose checks (needs helm: " + INSTALL_HINT + ")"
    )


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of the helm binary: $HELM, else <repo>/.tools/bin/helm. Missing helm fails."""
    candidate = os.environ.get("HELM") or str(REPO / ".tools" / "bin" / "helm")
    if not (Path(candidate).is_file() and os.access(candidate, os.X_OK)):
        pytest.fail(f"helm not found at {candidate}: {INSTALL_HINT}", pytrace=False)
    return candidate
