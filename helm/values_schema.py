"""Generates helm/flywheel/values.schema.json, the JSON schema Helm checks values against.

The schema is written here, in Python, because 1,800 lines of JSON with repeated definitions are
hard to edit by hand; tests/helm/test_chart.py checks that the committed file matches this script.

    python helm/values_schema.py          # rewrite values.schema.json
    python helm/values_schema.py --check  # exit 1 if it is out of date

Draft-07, which both Helm 3 (gojsonschema) and Helm 4 (santhosh-tekuri/jsonschema) read.
Every object forbids unknown keys, so a typo in a values file fails with the key's name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parent / "flywheel" / "values.schema.json"
Schema = dict[str, Any]


def string(**kw: Any) -> Schema:
    return {"type": "string", **kw}


def integer(**kw: Any) -> Schema:
    return {"type": "integer", **kw}


def number(**kw: Any) -> Schema:
    return {"type": "number", **kw}


def ref(name: str) -> Schema:
    return {"$ref": f"#/definitions/{name}"}


B: Schema = {"type": "boolean"}
OBJ: Schema = {"type": "object"}
STRMAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}


def obj(props: Schema, required: list[str] | None = None, desc: str | None = None, **kw: Any) -> Schema:
    """A closed object: only the listed properties are allowed."""
    o: Schema = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        o["required"] = required
    if desc:
        o["description"] = desc
    o.update(kw)
    return o


definitions: Schema = {
    "quantity": {
        "description": "A Kubernetes quantity such as 500m, 2, 16Gi.",
        "type": ["string", "number"],
        "pattern": "^[0-9]+(\\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$",
    },
    "port": integer(minimum=1, maximum=65535),
    "dtype": string(enum=["bfloat16", "float16", "float32"]),
    "cudaNeedsGpu": {
        "if": {"properties": {"device": {"const": "cuda"}}},
        "then": {
            "properties": {
                "gpu": {
                    "properties": {
                        "count": integer(
                            minimum=1, description="device=cuda needs at least one GPU (or set device=cpu)."
                        )
                    }
                }
            }
        },
    },
    "imageFlavor": {
        "description": "Which Flywheel image: cpu or gpu.",
        "type": "string",
        "enum": ["cpu", "gpu"],
    },
    "graceSeconds": integer(minimum=0, maximum=3600, description="SIGTERM drain time (grace_seconds)."),
    "probe": obj(
        {
            "initialDelaySeconds": integer(minimum=0),
            "periodSeconds": integer(minimum=1),
            "timeoutSeconds": integer(minimum=1),
            "failureThreshold": integer(minimum=1),
        },
        required=["periodSeconds", "failureThreshold"],
        desc="Probe timing; the handler is always the native gRPC health check.",
    ),
    "resources": obj(
        {
            "requests": {"type": "object", "additionalProperties": ref("quantity")},
            "limits": {"type": "object", "additionalProperties": ref("quantity")},
        },
        required=["requests", "limits"],
        desc="requests and limits; every container must have both.",
    ),
    "gpu": obj(
        {
            "count": integer(minimum=0, maximum=64),
            "resourceName": string(pattern="^[a-z0-9.-]+/[a-z0-9.-]+$"),
        },
        required=["count", "resourceName"],
    ),
    "pdb": obj(
        {
            "enabled": B,
            "maxUnavailable": {"type": ["integer", "string"], "pattern": "^[0-9]+%?$"},
            "minAvailable": {"type": ["integer", "string"], "pattern": "^([0-9]+%?)?$"},
        },
        required=["enabled"],
    ),
    "extraConfig": {
        "description": "Extra config fields for the service's YAML. Secrets and the fields the chart "
        "wires (host, ports, redis_url, internal_token) are not allowed here.",
        "type": "object",
        "propertyNames": {"not": {"enum": ["internal_token", "redis_url", "host", "port", "metrics_port"]}},
    },
    "storageClass": string(description='"" for the default class, "-" for none.'),
    "persistence": obj(
        {
            "enabled": B,
            "existingClaim": string(),
            "storageClass": ref("storageClass"),
            "accessModes": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "string",
                    "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"],
                },
            },
            "size": ref("quantity"),
            "annotations": STRMAP,
        },
        required=["enabled", "size"],
    ),
    "envList": {"type": "array", "items": {"type": "object", "required": ["name"]}},
}


def scheduling() -> Schema:
    return {
        "extraEnv": ref("envList"),
        "extraVolumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "extraVolumeMounts": {
            "type": "array",
            "items": {"type": "object", "required": ["name", "mountPath"]},
        },
        "podAnnotations": STRMAP,
        "podLabels": STRMAP,
        "nodeSelector": STRMAP,
        "tolerations": {"type": "array", "items": OBJ},
        "affinity": OBJ,
        "topologySpreadConstraints": {"type": "array", "items": OBJ},
        "priorityClassName": string(),
        "runtimeClassName": string(),
    }


def service(extra: Schema | None = None) -> Schema:
    props = {
        "type": string(enum=["ClusterIP", "NodePort", "LoadBalancer"]),
        "port": ref("port"),
        "metricsPort": ref("port"),
        "annotations": STRMAP,
    }
    props.update(extra or {})
    return obj(props, required=["port", "metricsPort"])


def component(
    specific: Schema,
    required: list[str],
    service_extra: Schema | None = None,
    with_gpu: bool = True,
    strategy: bool = True,
) -> Schema:
    """A service's values: the shared blocks (probes, resources, service, pdb...) plus ``specific``."""
    props = {
        "imageFlavor": ref("imageFlavor"),
        "graceSeconds": ref("graceSeconds"),
        "extraConfig": ref("extraConfig"),
        "resources": ref("resources"),
        "cacheSizeLimit": ref("quantity"),
        "shmSizeLimit": ref("quantity"),
        "startupProbe": ref("probe"),
        "livenessProbe": ref("probe"),
        "readinessProbe": ref("probe"),
        "service": service(service_extra),
        "pdb": ref("pdb"),
    }
    if with_gpu:
        props["gpu"] = ref("gpu")
    if strategy:
        props["strategy"] = obj(
            {
                "type": string(enum=["RollingUpdate", "Recreate"]),
                "rollingUpdate": obj(
                    {
                        "maxSurge": {"type": ["integer", "string"], "pattern": "^[0-9]+%?$"},
                        "maxUnavailable": {"type": ["integer", "string"], "pattern": "^[0-9]+%?$"},
                    }
                ),
            },
            required=["type"],
        )
    props.update(scheduling())
    props.update(specific)
    return obj(
        props,
        required=[
            "imageFlavor",
            "graceSeconds",
            "resources",
            "service",
            "pdb",
            "startupProbe",
            "livenessProbe",
            "readinessProbe",
            *required,
        ],
    )


image_ref = obj(
    {
        "repository": string(minLength=1),
        "tag": string(),
        "digest": string(pattern="^(sha256:[0-9a-f]{64})?$"),
    },
    required=["repository"],
)

generator = component(
    {
        "replicaCount": integer(minimum=1, maximum=1024),
        "model": {
            **obj(
                {
                    "source": string(
                        enum=["hub", "path", "pvc"],
                        description="hub (Hugging Face id), path (directory in the container) or pvc.",
                    ),
                    "hubId": string(),
                    "path": string(),
                    "pvc": obj(
                        {"claimName": string(), "subPath": string(), "mountPath": string(pattern="^/")},
                        required=["claimName", "mountPath"],
                    ),
                    "hfTokenSecret": obj({"name": string(), "key": string(minLength=1)}),
                },
                required=["source"],
            ),
            "allOf": [
                {
                    "if": {"properties": {"source": {"const": "hub"}}},
                    "then": {
                        "properties": {
                            "hubId": string(
                                minLength=1, pattern="^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)?$"
                            )
                        },
                        "required": ["hubId"],
                    },
                },
                {
                    "if": {"properties": {"source": {"const": "path"}}},
                    "then": {"properties": {"path": string(pattern="^/")}, "required": ["path"]},
                },
                {
                    "if": {"properties": {"source": {"const": "pvc"}}},
                    "then": {"properties": {"pvc": {"properties": {"claimName": string(minLength=1)}}}},
                },
            ],
        },
        "engine": string(enum=["vllm", "transformers"]),
        "dtype": ref("dtype"),
        "device": string(enum=["cuda", "cpu"]),
        "maxBatchSize": integer(minimum=1, maximum=4096),
        "maxWaitMs": integer(minimum=0, maximum=60000),
        "completionTtlSeconds": integer(minimum=60),
        "gpuMemoryUtilization": number(exclusiveMinimum=0, maximum=1),
    },
    ["replicaCount", "model", "engine", "device", "gpu"],
)
generator["allOf"] = [
    {
        "if": {"properties": {"engine": {"const": "vllm"}}},
        "then": {
            "properties": {
                "device": {
                    "const": "cuda",
                    "description": "engine=vllm runs on cuda; use engine=transformers on CPU.",
                }
            }
        },
    },
    ref("cudaNeedsGpu"),
]

reward = component(
    {
        "replicaCount": integer(minimum=1, maximum=1024),
        "model": string(),
        "device": string(enum=["cpu", "cuda"]),
        "dtype": ref("dtype"),
        "scorers": {
            "type": "object",
            "description": "Named scorer sets; each a non-empty list of {name, kind, weight, params}.",
            "propertyNames": {"pattern": "^[A-Za-z0-9_.-]{1,64}$"},
            "additionalProperties": {
                "type": "array",
                "minItems": 1,
                "items": obj(
                    {
                        "name": string(pattern="^[A-Za-z0-9_.-]{1,64}$"),
                        "kind": string(enum=["model", "vader", "length_penalty", "regex", "keyword", "rule"]),
                        "weight": number(),
                        "params": OBJ,
                    },
                    required=["name", "kind"],
                ),
            },
        },
        "maxBatchSize": integer(minimum=1, maximum=4096),
    },
    ["replicaCount", "device", "gpu"],
)
reward["allOf"] = [ref("cudaNeedsGpu")]

feedback = component(
    {
        "replicaCount": integer(minimum=1, maximum=1024),
        "rateLimitPerSecond": number(minimum=0, description="0 turns rate limiting off."),
        "rateLimitBurst": integer(minimum=1),
        "maxBatchEvents": integer(minimum=1),
        "durability": string(enum=["everysec", "always"]),
        "idempotencyTtlSeconds": integer(
            minimum=3600, description="At least an hour, so retries stay idempotent."
        ),
        "autoscaling": obj(
            {
                "enabled": B,
                "minReplicas": integer(minimum=1),
                "maxReplicas": integer(minimum=1),
                "targetCPUUtilizationPercentage": integer(minimum=1, maximum=100),
                "targetMemoryUtilizationPercentage": {
                    "type": ["integer", "string"],
                    "pattern": "^$",
                    "minimum": 1,
                    "maximum": 100,
                },
                "behavior": OBJ,
            },
            required=["enabled"],
        ),
    },
    ["replicaCount", "durability"],
    service_extra={"loadBalancerSourceRanges": {"type": "array", "items": string()}},
    with_gpu=False,
)

learner = component(
    {
        "policyModel": string(),
        "algorithm": string(enum=["ppo", "grpo", "rloo", "rebel"]),
        "autostart": B,
        "promptStream": B,
        "promptsFile": string(),
        "rewardTarget": string(),
        "generatorTargets": string(),
        "persistence": ref("persistence"),
    },
    ["algorithm", "persistence"],
    strategy=False,
)

redis: Schema = {
    **obj(
        {
            "enabled": B,
            "externalUrl": string(
                pattern="^((redis|rediss|unix)://.+)?$",
                description="redis://, rediss:// or unix:// URL of your Redis.",
            ),
            "externalUrlSecret": obj({"name": string(), "key": string(minLength=1)}),
            "database": integer(minimum=0, maximum=15),
            "image": obj(
                {
                    "registry": string(),
                    "repository": string(minLength=1),
                    "tag": string(minLength=1),
                    "digest": string(pattern="^(sha256:[0-9a-f]{64})?$"),
                    "pullPolicy": string(enum=["Always", "IfNotPresent", "Never"]),
                },
                required=["repository", "tag"],
            ),
            "auth": obj(
                {
                    "enabled": B,
                    "password": string(
                        pattern='^[^\\s"\\\\]*$', description="No whitespace, quotes or backslashes."
                    ),
                },
                required=["enabled"],
            ),
            "appendfsync": string(enum=["everysec", "always"]),
            "extraConfig": string(),
            "persistence": obj(
                {
                    "enabled": B,
                    "storageClass": ref("storageClass"),
                    "accessModes": {"type": "array", "minItems": 1, "items": string()},
                    "size": ref("quantity"),
                    "annotations": STRMAP,
                },
                required=["enabled", "size"],
            ),
            "resources": ref("resources"),
            "podSecurityContext": OBJ,
            "securityContext": OBJ,
            "podAnnotations": STRMAP,
            "nodeSelector": STRMAP,
            "tolerations": {"type": "array", "items": OBJ},
            "affinity": OBJ,
            "priorityClassName": string(),
        },
        required=["enabled"],
    ),
    "if": {"properties": {"enabled": {"const": False}}},
    "then": {
        "description": "redis.enabled=false needs redis.externalUrl or redis.externalUrlSecret.name.",
        "anyOf": [
            {"properties": {"externalUrl": string(minLength=1)}, "required": ["externalUrl"]},
            {
                "properties": {
                    "externalUrlSecret": {"properties": {"name": string(minLength=1)}, "required": ["name"]}
                },
                "required": ["externalUrlSecret"],
            },
        ],
    },
}

ns_list = {"type": "array", "items": string(pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", maxLength=63)}

schema: Schema = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "Values of the flywheel chart",
    "type": "object",
    "additionalProperties": False,
    "required": ["image", "auth", "generator", "reward", "feedback", "learner", "redis"],
    "definitions": definitions,
    "properties": {
        "nameOverride": string(),
        "fullnameOverride": string(pattern="^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"),
        "clusterDomain": string(minLength=1),
        "commonLabels": STRMAP,
        "global": {
            "type": "object",
            "properties": {"imageRegistry": string(), "imagePullSecrets": {"type": "array", "items": OBJ}},
        },
        "image": obj(
            {
                "registry": string(),
                "pullPolicy": string(enum=["Always", "IfNotPresent", "Never"]),
                "cpu": image_ref,
                "gpu": image_ref,
            },
            required=["cpu", "gpu"],
        ),
        "serviceAccount": obj(
            {"create": B, "name": string(), "annotations": STRMAP, "automountServiceAccountToken": B},
            required=["create"],
        ),
        "podSecurityContext": {
            "type": "object",
            "description": "Pod securityContext.",
            "properties": {"runAsNonRoot": {"const": True}},
        },
        "securityContext": {
            "type": "object",
            "description": "Container securityContext.",
            "properties": {
                "runAsNonRoot": {"const": True},
                "privileged": {"const": False},
                "allowPrivilegeEscalation": {"const": False},
            },
        },
        "config": obj(
            {
                "logLevel": string(enum=["DEBUG", "INFO", "WARNING", "ERROR"]),
                "logFormat": string(enum=["json", "text"]),
                "maxMessageBytes": integer(minimum=1024, maximum=2147483647),
            },
            required=["logLevel", "logFormat", "maxMessageBytes"],
        ),
        "auth": obj(
            {
                "existingSecret": string(),
                "internalToken": string(
                    pattern="^(\\S{16,})?$",
                    description="At least 16 characters, no whitespace; empty to generate.",
                ),
                "apiKey": obj(
                    {
                        "clientName": string(pattern="^[A-Za-z0-9._-]+$"),
                        "value": string(
                            pattern="^(\\S{16,})?$",
                            description="At least 16 characters, no whitespace; empty to generate.",
                        ),
                    },
                    required=["clientName"],
                ),
                "extraClients": {
                    "type": "array",
                    "items": obj(
                        {
                            "name": string(pattern="^[A-Za-z0-9._-]+$"),
                            "sha256": string(
                                pattern="^[0-9a-fA-F]{64}$", description="sha256 hex of the client's key"
                            ),
                        },
                        required=["name", "sha256"],
                    ),
                },
            },
            required=["apiKey"],
        ),
        "generator": generator,
        "reward": reward,
        "feedback": feedback,
        "learner": learner,
        "redis": redis,
        "networkPolicy": obj(
            {
                "enabled": B,
                "clientNamespaces": ns_list,
                "clientPeers": {"type": "array", "items": OBJ},
                "metricsNamespaces": ns_list,
                "metricsPeers": {"type": "array", "items": OBJ},
            },
            required=["enabled"],
        ),
        "metrics": obj(
            {
                "serviceMonitor": obj(
                    {
                        "enabled": B,
                        "namespace": string(),
                        "labels": STRMAP,
                        "interval": string(pattern="^[0-9]+(ms|s|m|h)$"),
                        "scrapeTimeout": string(pattern="^[0-9]+(ms|s|m|h)$"),
                    },
                    required=["enabled"],
                ),
                "dashboard": obj(
                    {"enabled": B, "namespace": string(), "labels": STRMAP, "annotations": STRMAP},
                    required=["enabled"],
                ),
            }
        ),
    },
}


def render() -> str:
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check"]:
        if SCHEMA_PATH.read_text() != render():
            print(f"{SCHEMA_PATH} is out of date: run python helm/values_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(render())
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
