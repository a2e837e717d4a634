"""The Helm chart, rendered offline: lint, Kubernetes schemas, and the properties that matter.

Each scenario (default values, the example values files, external Redis, every option) is
rendered once with `helm template`; the tests then read the manifests as plain dicts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.helm

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "flywheel"
EXAMPLES = REPO / "helm" / "examples"
HERE = Path(__file__).resolve().parent
BAD_VALUES = sorted((HERE / "bad-values").glob("*.yaml"))
RELEASE, NAMESPACE = "flywheel", "rlhf"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a recent one.
KUBE_VERSIONS = ("1.27.0", "1.33.0")
SERVICES = ("generator", "reward", "feedback", "learner")
EXTERNAL_REDIS_URL = "rediss://:s3cret-pass@redis.example.internal:6380/2"
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # no bundled schema


@dataclass(frozen=True)
class Scenario:
    values_files: tuple[Path, ...] = ()
    set_values: tuple[str, ...] = field(default_factory=tuple)

    def helm_args(self) -> list[str]:
        args = [arg for f in self.values_files for arg in ("-f", str(f))]
        return args + [arg for s in self.set_values for arg in ("--set", s)]


SCENARIOS = {
    "default": Scenario(),
    "single-gpu": Scenario((EXAMPLES / "values-single-gpu.yaml",)),
    "multi-gpu": Scenario((EXAMPLES / "values-multi-gpu.yaml",)),
    "external-redis": Scenario(set_values=("redis.enabled=false", f"redis.externalUrl={EXTERNAL_REDIS_URL}")),
    "all-options": Scenario((HERE / "values-all-options.yaml",)),
}
GPU_EXAMPLES = ("single-gpu", "multi-gpu")


# ------------------------------------------------------------------------------------------
# Rendering helpers
# ------------------------------------------------------------------------------------------


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60)


@cache
def render(helm: str, name: str, kube_version: str = KUBE_VERSIONS[-1]) -> list[dict[str, Any]]:
    args = ["template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", kube_version]
    proc = run_helm(helm, *args, *SCENARIOS[name].helm_args())
    assert proc.returncode == 0, f"helm template ({name}) failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert found, f"no {kind} named {name}"
    return found[0]


def component(doc: dict[str, Any]) -> str:
    name: str = doc["metadata"]["labels"].get("app.kubernetes.io/component", "")
    return name


def workload(docs: list[dict[str, Any]], service: str) -> dict[str, Any]:
    return named(docs, "Deployment", f"{RELEASE}-{service}")


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def secret_data(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    data = named(docs, "Secret", name).get("data", {})
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


def service_config(docs: list[dict[str, Any]], service: str) -> dict[str, Any]:
    config_map = named(docs, "ConfigMap", f"{RELEASE}-config")
    config: dict[str, Any] = yaml.safe_load(config_map["data"][f"{service}.yaml"])
    return config


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def expected_error(values_file: Path) -> str:
    match = re.search(r"^# expect: (.+)$", values_file.read_text(), re.M)
    assert match, f"{values_file.name} needs an '# expect: <text>' line"
    return match.group(1).strip()


@pytest.fixture(scope="module")
def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as kv
    except ImportError:
        pytest.fail("kubernetes-validate missing: run scripts/setup.sh (the dev extra installs it)")
    return kv


# ------------------------------------------------------------------------------------------
# Lint and schemas
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCENARIOS)
def test_helm_lint_strict(helm: str, name: str) -> None:
    proc = run_helm(helm, "lint", "--strict", str(CHART), *SCENARIOS[name].helm_args())
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", SCENARIOS)
def test_manifests_match_kubernetes_schemas(
    helm: str, kubernetes_validate: Any, name: str, kube_version: str
) -> None:
    errors = []
    for doc in render(helm, name, kube_version):
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = "/".join(str(p) for p in err.absolute_path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']} at {where}: {err.message}")
    assert not errors, "\n".join(errors)


def test_values_schema_matches_its_generator() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "helm" / "values_schema.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("bad", BAD_VALUES, ids=lambda p: p.stem)
@pytest.mark.parametrize("command", ["lint", "template"])
def test_bad_values_are_rejected_with_the_field_named(helm: str, bad: Path, command: str) -> None:
    args = ["lint", "--strict", str(CHART)] if command == "lint" else ["template", "x", str(CHART)]
    proc = run_helm(helm, *args, "-f", str(bad))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"{bad.name} was accepted by helm {command}"
    # Helm 3 names fields a.b.c, Helm 4 /a/b/c.
    assert expected_error(bad) in output.replace("/", "."), output


def test_cross_field_checks_stop_the_render(helm: str) -> None:
    # JSON schema cannot compare two fields; the chart's `fail` does (helm lint only logs it).
    cases = {
        "feedback.autoscaling.minReplicas must not exceed": [
            "feedback.autoscaling.enabled=true",
            "feedback.autoscaling.minReplicas=8",
            "feedback.autoscaling.maxReplicas=4",
        ],
        "feedback.rateLimitBurst must be at least feedback.maxBatchEvents": [
            "feedback.rateLimitBurst=10",
            "feedback.maxBatchEvents=100",
        ],
    }
    for message, sets in cases.items():
        args = [a for s in sets for a in ("--set", s)]
        proc = run_helm(helm, "template", "x", str(CHART), *args)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------
# Contract with the Python services: their own config loader accepts what the chart renders
# ------------------------------------------------------------------------------------------


def container_environ(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the pod would see it (Secrets resolved from the render)."""
    environ = {}
    for var in container.get("env", []):
        if "value" in var:
            environ[var["name"]] = str(var["value"])
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            rendered = [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == ref["name"]]
            value = secret_data(docs, ref["name"])[ref["key"]] if rendered else "redis://external:6379/0"
            environ[var["name"]] = value
    return environ


@pytest.mark.parametrize("name", SCENARIOS)
def test_services_accept_the_rendered_config(helm: str, name: str, tmp_path: Path) -> None:
    config_module = pytest.importorskip("flywheel.common.config")
    services_module = pytest.importorskip("flywheel.services")
    docs = render(helm, name)
    api_keys = tmp_path / "api-keys"
    api_keys.write_text(secret_data(docs, f"{RELEASE}-auth")["api-keys"])
    for service in SERVICES:
        config = service_config(docs, service)
        if "api_keys_file" in config:
            config["api_keys_file"] = str(api_keys)  # the Secret volume's path inside the pod
        path = tmp_path / f"{service}.yaml"
        path.write_text(yaml.safe_dump(config))
        container = pod_spec(workload(docs, service))["containers"][0]
        environ = container_environ(docs, container)
        environ.pop("FLYWHEEL_API_KEYS_FILE", None)
        cls = services_module.SERVICES[service].config_class()
        loaded = config_module.load_config(cls, service, path, environ=environ)
        assert loaded.port == container["ports"][0]["containerPort"], service
        assert loaded.host == "0.0.0.0" and loaded.redis_url.startswith("redis"), service
        assert bool(loaded.internal_token) == (service != "feedback"), service


# ------------------------------------------------------------------------------------------
# Pods: probes, resources, hardening
# ------------------------------------------------------------------------------------------


def all_pods(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(component(d), pod_spec(d)) for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_container_has_probes_and_resources(helm: str, name: str) -> None:
    pods = all_pods(render(helm, name))
    assert {c for c, _ in pods} >= set(SERVICES)
    for comp, pod in pods:
        for c in pod["containers"] + pod.get("initContainers", []):
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert probe in c, f"{comp}/{c['name']} has no {probe}"
                if comp in SERVICES:  # native gRPC health on the service's gRPC port
                    grpc_port = next(p for p in c["ports"] if p["name"] == "grpc")
                    assert c[probe]["grpc"]["port"] == grpc_port["containerPort"]
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            assert {"cpu", "memory"} <= requests.keys(), f"{comp}/{c['name']} requests"
            assert {"cpu", "memory"} <= limits.keys(), f"{comp}/{c['name']} limits"


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_container_is_hardened(helm: str, name: str) -> None:
    for comp, pod in all_pods(render(helm, name)):
        assert pod["automountServiceAccountToken"] is False, comp
        assert pod["securityContext"]["runAsNonRoot"] is True, comp
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", comp
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, comp
            assert sc["readOnlyRootFilesystem"] is True, comp
            assert sc["allowPrivilegeEscalation"] is False, comp
            assert sc["capabilities"]["drop"] == ["ALL"], comp
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", comp
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{comp}: /tmp must be an emptyDir"
            if comp in SERVICES:  # the read-only root needs writable caches
                assert "emptyDir" in volumes[mounts["/cache"]], comp
                assert env_of(c)["HF_HOME"]["value"].startswith("/cache/"), comp


@pytest.mark.parametrize("name", SCENARIOS)
def test_grace_period_exceeds_the_drain(helm: str, name: str) -> None:
    docs = render(helm, name)
    for service in SERVICES:
        pod = pod_spec(workload(docs, service))
        assert pod["terminationGracePeriodSeconds"] > service_config(docs, service)["grace_seconds"]


@pytest.mark.parametrize("name", GPU_EXAMPLES)
def test_gpu_examples_request_gpus(helm: str, name: str) -> None:
    docs = render(helm, name)
    for service in ("generator", "learner"):
        limits = pod_spec(workload(docs, service))["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, service
        assert service_config(docs, "generator")["device"] == "cuda"
        assert "gpu" in pod_spec(workload(docs, service))["containers"][0]["image"]


def test_generator_gets_a_gpu_by_default_and_none_when_on_cpu(helm: str) -> None:
    gen = pod_spec(workload(render(helm, "default"), "generator"))["containers"][0]
    assert gen["resources"]["limits"]["nvidia.com/gpu"] == 1
    gen = pod_spec(workload(render(helm, "all-options"), "generator"))["containers"][0]
    assert "nvidia.com/gpu" not in gen["resources"]["limits"]


# ------------------------------------------------------------------------------------------
# Secrets
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCENARIOS)
def test_no_secret_in_any_configmap(helm: str, name: str) -> None:
    docs = render(helm, name)
    secrets = {
        value.strip()
        for s in of_kind(docs, "Secret")
        for key, value in secret_data(docs, s["metadata"]["name"]).items()
        if key != "api-keys"  # hashes, and the file's comment line
    }
    secrets |= {"test-internal-token-0123456789", "fw_test-api-key-0123456789abcdef"}
    secrets |= {"test-redis-password-0123456789", EXTERNAL_REDIS_URL, "s3cret-pass"}
    for cm in of_kind(docs, "ConfigMap"):
        text = json.dumps(cm["data"])
        leaked = [s for s in secrets if len(s) >= 8 and s in text]
        assert not leaked, f"ConfigMap {cm['metadata']['name']} contains a secret"
        for service in SERVICES:
            if f"{service}.yaml" in cm["data"]:
                keys = service_config(docs, service).keys()
                assert not keys & {"internal_token", "redis_url"}, service
    for _, pod in all_pods(docs):
        for c in pod["containers"]:
            for var in ("FLYWHEEL_INTERNAL_TOKEN", "FLYWHEEL_REDIS_URL", "REDISCLI_AUTH"):
                if var in env_of(c):
                    assert "secretKeyRef" in env_of(c)[var]["valueFrom"], var


def test_api_keys_file_holds_the_hash_of_the_api_key(helm: str) -> None:
    docs = render(helm, "all-options")
    api_key = secret_data(docs, f"{RELEASE}-api-key")["api-key"]
    auth = secret_data(docs, f"{RELEASE}-auth")
    lines = [ln for ln in auth["api-keys"].splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == f"ci {hashlib.sha256(api_key.encode()).hexdigest()}"
    assert lines[1].startswith("web-app ")
    assert auth["internal-token"] == "test-internal-token-0123456789"


def test_credentials_are_generated_when_not_given(helm: str) -> None:
    docs = render(helm, "default")
    api_key = secret_data(docs, f"{RELEASE}-api-key")["api-key"]
    auth = secret_data(docs, f"{RELEASE}-auth")
    assert len(api_key) >= 32 and len(auth["internal-token"]) >= 32
    assert f"default {hashlib.sha256(api_key.encode()).hexdigest()}" in auth["api-keys"]
    # Upgrades keep them: the template reads the live Secrets back with lookup.
    source = (CHART / "templates" / "secrets.yaml").read_text()
    for secret in ("$authName", "$keyName", "$redisName"):
        assert f'lookup "v1" "Secret" $ns {secret}' in source


def test_api_key_reaches_only_the_public_services(helm: str) -> None:
    docs = render(helm, "default")
    for service in SERVICES:
        pod = pod_spec(workload(docs, service))
        has_keys = any(
            v.get("secret", {}).get("secretName") == f"{RELEASE}-auth"
            and v["secret"]["items"][0]["key"] == "api-keys"
            for v in pod["volumes"]
        )
        assert has_keys == (service in ("generator", "feedback")), service
        has_token = "FLYWHEEL_INTERNAL_TOKEN" in env_of(pod["containers"][0])
        assert has_token == (service != "feedback"), service


# ------------------------------------------------------------------------------------------
# Wiring: headless service, learner, Redis
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCENARIOS)
def test_learner_targets_every_generator_through_the_headless_service(helm: str, name: str) -> None:
    docs = render(helm, name)
    config = service_config(docs, "learner")
    match = re.fullmatch(
        r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", config["generator_targets"]
    )
    assert match, config["generator_targets"]
    service_name, namespace, port = match.groups()
    headless = named(docs, "Service", service_name)
    assert namespace == NAMESPACE
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["ports"][0]["port"] == int(port)
    generator = workload(docs, "generator")
    pod_labels = generator["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= pod_labels.items()
    reward_host, reward_port = config["reward_target"].rsplit(":", 1)
    reward = named(docs, "Service", reward_host)
    assert reward["spec"]["ports"][0]["port"] == int(reward_port)


@pytest.mark.parametrize("name", SCENARIOS)
def test_learner_is_one_recreated_replica_with_checkpoint_storage(helm: str, name: str) -> None:
    docs = render(helm, name)
    learner = workload(docs, "learner")
    assert learner["spec"]["replicas"] == 1
    assert learner["spec"]["strategy"] == {"type": "Recreate"}
    pod = pod_spec(learner)
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "state")
    assert service_config(docs, "learner")["checkpoint_dir"].startswith(mount["mountPath"] + "/")
    claim = next(v for v in pod["volumes"] if v["name"] == "state")["persistentVolumeClaim"]
    if name == "all-options":
        assert claim["claimName"] == "my-checkpoints"
    else:
        assert named(docs, "PersistentVolumeClaim", claim["claimName"])


def test_bundled_redis_is_a_statefulset_with_aof_and_a_pvc(helm: str) -> None:
    docs = render(helm, "default")
    redis = named(docs, "StatefulSet", f"{RELEASE}-redis")
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    conf = named(docs, "ConfigMap", f"{RELEASE}-redis-config")["data"]["redis.conf"]
    assert "appendonly yes" in conf and "requirepass" not in conf
    redis_secret = secret_data(docs, f"{RELEASE}-redis")
    assert redis_secret["redis-url"] == (f"redis://:{redis_secret['redis-password']}@{RELEASE}-redis:6379/0")
    assert named(docs, "Service", f"{RELEASE}-redis")


def test_external_redis_replaces_the_statefulset(helm: str) -> None:
    docs = render(helm, "external-redis")
    assert not of_kind(docs, "StatefulSet")
    assert not [d for d in docs if component(d) == "redis" and d["kind"] != "Secret"]
    assert secret_data(docs, f"{RELEASE}-redis") == {"redis-url": EXTERNAL_REDIS_URL}
    for service in SERVICES:
        env = env_of(pod_spec(workload(docs, service))["containers"][0])
        assert env["FLYWHEEL_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": f"{RELEASE}-redis",
            "key": "redis-url",
        }


def test_external_redis_from_an_existing_secret(helm: str) -> None:
    docs = render(helm, "multi-gpu")
    assert not of_kind(docs, "StatefulSet")
    assert not [s for s in of_kind(docs, "Secret") if component(s) == "redis"]
    env = env_of(pod_spec(workload(docs, "feedback"))["containers"][0])
    assert env["FLYWHEEL_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "flywheel-redis-url",
        "key": "redis-url",
    }


def test_model_from_a_pvc_is_mounted_read_only_for_generator_and_learner(helm: str) -> None:
    docs = render(helm, "all-options")
    assert service_config(docs, "generator")["model"] == "/models/tiny-llama"
    assert service_config(docs, "learner")["policy_model"] == "/models/tiny-llama"
    for service in ("generator", "learner"):
        pod = pod_spec(workload(docs, service))
        volume = next(v for v in pod["volumes"] if v["name"] == "model")
        assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model")
        assert mount["readOnly"] is True and mount["mountPath"] == "/models"


# ------------------------------------------------------------------------------------------
# Availability, network, scaling, monitoring
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCENARIOS)
def test_pod_disruption_budgets_cover_the_scaled_services(helm: str, name: str) -> None:
    docs = render(helm, name)
    pdbs = {component(p): p for p in of_kind(docs, "PodDisruptionBudget")}
    expected = {"generator", "reward", "feedback"}
    if name == "single-gpu":  # one feedback replica there: its PDB is switched off
        expected.remove("feedback")
    assert expected <= pdbs.keys()
    for comp, pdb in pdbs.items():
        pod_labels = workload(docs, comp)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize("name", SCENARIOS)
def test_network_policies_keep_internal_rpcs_for_the_learner(helm: str, name: str) -> None:
    docs = render(helm, name)
    policies = {component(p): p for p in of_kind(docs, "NetworkPolicy")}
    assert set(SERVICES) <= policies.keys()
    learner_peer = {"podSelector": {"matchLabels": pod_spec_labels(docs, "learner")}}
    for comp, policy in policies.items():
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), f"{comp}: an ingress rule without 'from' admits everyone"
    reward_grpc = grpc_rules(policies["reward"])
    assert [r["from"] for r in reward_grpc] == [[learner_peer]]
    assert learner_peer in grpc_rules(policies["generator"])[0]["from"]
    assert not grpc_rules(policies["learner"])
    if name == "all-options":
        clients = grpc_rules(policies["feedback"])[0]["from"]
        namespaces = clients[0]["namespaceSelector"]["matchExpressions"][0]["values"]
        assert namespaces == ["app", "ingress-nginx"] and clients[1]["ipBlock"]
    if "redis" in policies:
        peers = policies["redis"]["spec"]["ingress"][0]["from"]
        assert peers[0]["podSelector"]["matchExpressions"][0]["values"] == list(SERVICES)


def pod_spec_labels(docs: list[dict[str, Any]], service: str) -> dict[str, str]:
    labels = workload(docs, service)["spec"]["template"]["metadata"]["labels"]
    return {k: v for k, v in labels.items() if k.startswith("app.kubernetes.io/")}


def grpc_rules(policy: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "grpc"]


def test_feedback_autoscaling(helm: str) -> None:
    docs = render(helm, "all-options")
    hpa = named(docs, "HorizontalPodAutoscaler", f"{RELEASE}-feedback")
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{RELEASE}-feedback"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert "replicas" not in workload(docs, "feedback")["spec"]
    assert not of_kind(render(helm, "default"), "HorizontalPodAutoscaler")


def test_service_monitor_scrapes_every_service_once(helm: str) -> None:
    docs = render(helm, "all-options")
    monitor = named(docs, "ServiceMonitor", RELEASE)
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    with_metrics = [
        s for s in of_kind(docs, "Service") if any(p["name"] == "metrics" for p in s["spec"]["ports"])
    ]
    assert sorted(component(s) for s in with_metrics) == sorted(SERVICES)
    assert not of_kind(render(helm, "default"), "ServiceMonitor")


def test_grafana_dashboard_covers_the_loop(helm: str) -> None:
    docs = render(helm, "default")
    dashboard_cm = named(docs, "ConfigMap", f"{RELEASE}-dashboard")
    assert dashboard_cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(dashboard_cm["data"]["flywheel.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in (
        "flywheel_learner_reward_mean",
        "flywheel_learner_kl",
        "flywheel_generator_policy_version",
        "flywheel_learner_policy_version",
        "flywheel_generator_push_seconds_bucket",
        "flywheel_feedback_events_accepted_total",
        "flywheel_feedback_stream_lag_events",
        "flywheel_learner_step_seconds_bucket",
    ):
        assert metric in exprs, metric


def test_notes_tell_how_to_reach_feedback_and_read_the_api_key(helm: str, tmp_path: Path) -> None:
    # `helm template` skips NOTES.txt, so render it through tpl in a scratch copy of the chart.
    chart = tmp_path / "flywheel"
    shutil.copytree(CHART, chart)
    (chart / "notes-under-test.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "notes-under-test.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  notes: {{ tpl (.Files.Get "notes-under-test.txt") . | quote }}\n'
    )
    proc = run_helm(
        helm,
        "template",
        RELEASE,
        str(chart),
        "-n",
        NAMESPACE,
        "--show-only",
        "templates/notes-under-test.yaml",
    )
    assert proc.returncode == 0, proc.stderr
    notes = yaml.safe_load(proc.stdout)["data"]["notes"]
    assert f"port-forward svc/{RELEASE}-feedback 50053:50053" in notes
    assert (
        f"kubectl -n {NAMESPACE} get secret {RELEASE}-api-key -o jsonpath='{{.data.api-key}}' | base64 -d"
    ) in notes
