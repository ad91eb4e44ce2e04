"""`kiban render k8s`: plain Kubernetes manifests for a kiban.yaml.

Files written into the output directory (``kubectl apply -f DIR``)::

    gateway.yaml          ConfigMap (kiban.yaml), Deployment (N replicas), Service
    engine-<name>.yaml    PersistentVolumeClaim (model cache), Deployment, Service
    gpu-exporter.yaml     DaemonSet on GPU nodes (when an engine runs on a GPU)
    monitoring.yaml       ServiceMonitors, PodMonitor, PrometheusRule (prometheus-operator)

The gateway is stateless: its replicas share nothing but the configuration
(and ``gateway.shared_state``, passed through, where set). Secrets never go
into the files: every ``${VAR}`` of kiban.yaml, the API key variables and
``HF_TOKEN`` come from one Secret (``<name>-secrets``) the operator creates.

Engines are Deployments of one replica with the ``Recreate`` strategy, not
StatefulSets: an engine keeps no state a restart must find again except its
model cache, which is a claim of its own; Recreate frees the GPUs and the
ReadWriteOnce claim before the new pod asks for them (a rolling update would
wait for a second set of GPUs that is not there).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kiban.config import ENV_REFERENCE, KibanConfig
from kiban.deploy.compose import GATEWAY_IMAGE
from kiban.deploy.containers import (
    ENGINE_SECRETS,
    GATEWAY_API_KEYS,
    GATEWAY_CONFIG,
    MODEL_CACHE,
    ContainerEngine,
    ContainerError,
    container_engines,
    dump_config,
    dump_yaml,
    env_references,
    gateway_config,
    service_names,
)
from kiban.observability.render import ALERT_RULES
from kiban.observability.scrape import (
    ENGINE_JOB_PREFIX,
    GATEWAY_JOB,
    GPU_JOB,
    engine_recording_rules,
)
from kiban.sizing.plan import Plan
from kiban.sizing.units import GiB

GPU_RESOURCE = "nvidia.com/gpu"
#: a node label NVIDIA's GPU feature discovery (and the GPU operator) sets on GPU nodes
GPU_NODE_LABEL = "nvidia.com/gpu.present"
GATEWAY_UID = 10001  # the gateway image's user (Dockerfile)
MIN_CACHE_GIB = 10
STARTUP_PERIOD_S = 10
#: kiban's own object names (after the prefix), which no engine may take
_OWN = ("gateway", "gpu-exporter", "rules", "secrets")


@dataclass(frozen=True)
class K8sOptions:
    """Choices the configuration does not make."""

    name: str = "kiban"
    namespace: str | None = None
    replicas: int = 2
    gateway_image: str = GATEWAY_IMAGE
    storage_class: str | None = None
    model_cache_size: str | None = None


@dataclass
class Manifests:
    """The objects, by the file they go into, and what the operator must provide."""

    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    secret: str = ""
    secret_keys: dict[str, bool] = field(default_factory=dict)  # key -> optional
    notes: list[str] = field(default_factory=list)

    @property
    def objects(self) -> list[dict[str, Any]]:
        return [obj for objs in self.files.values() for obj in objs]


def render_k8s(cfg: KibanConfig, raw: dict[str, Any], plan: Plan, options: K8sOptions) -> Manifests:
    """Every object for *cfg*; ContainerError names what cannot run in a cluster."""
    prefix = options.name
    services = service_names(cfg, f"{prefix}-", tuple(f"{prefix}-{s}" for s in _OWN))
    engines = container_engines(cfg, plan, services, raw)
    local = [e for e in engines if e.local_model is not None]
    if local:
        raise ContainerError(
            [
                f"engine {e.name!r}: launch.model {e.local_model.host_path} is a path on this "
                "machine, which a pod cannot mount; give a hub name (the engine downloads it "
                "into its model cache claim)"
                for e in local
                if e.local_model is not None
            ]
        )
    on_gpu = any(e.device == "gpu" for e in engines)
    exporter = on_gpu and cfg.observability.gpu_exporter != "off"
    tree = gateway_config(
        raw,
        {e.name: e.url for e in engines},
        loopback_host=None,
        api_keys_path=GATEWAY_API_KEYS if cfg.gateway.api_keys.file is not None else None,
        observability={"gpu_exporter": "standalone" if exporter else "off"},
    )
    out = Manifests(secret=f"{prefix}-secrets")
    for var, has_default in env_references(tree).items():
        out.secret_keys[var] = has_default
    for var in cfg.gateway.api_keys.env:
        out.secret_keys[var] = False
    if cfg.gateway.api_keys.file is not None:
        out.secret_keys["api-keys"] = False
    builder = _Builder(cfg, options, out)
    out.files["gateway.yaml"] = builder.gateway(tree)
    for engine in engines:
        out.files[f"engine-{engine.service.removeprefix(prefix + '-')}.yaml"] = builder.engine(
            engine, plan
        )
    if exporter:
        out.files["gpu-exporter.yaml"] = [builder.gpu_exporter()]
    out.files["monitoring.yaml"] = builder.monitoring(engines, exporter)
    shared = sorted({g for e in engines for g in e.gpus if sum(g in x.gpus for x in engines) > 1})
    if shared:
        out.notes.append(
            f"the plan shares GPU {', '.join(map(str, shared))} between engines; the cluster "
            f"gives each pod whole GPUs ({GPU_RESOURCE}), so each engine gets its own and the "
            "planned memory shares are conservative (unless the cluster time-slices GPUs)"
        )
    if options.gateway_image == GATEWAY_IMAGE:
        out.notes.append(
            f"the gateway image is {GATEWAY_IMAGE}, a local tag: build it (docker build -t "
            f"{GATEWAY_IMAGE} .), push it where the cluster pulls from, and pass --gateway-image"
        )
    if options.replicas > 1 and "shared_state" not in (raw.get("gateway") or {}):
        out.notes.append(
            f"{options.replicas} gateway replicas without gateway.shared_state: rate limits "
            "and circuit breakers are counted by each replica on its own"
        )
    return out


def write_manifests(manifests: Manifests, out_dir: Path) -> list[Path]:
    """One multi-document YAML file per component; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, objects in manifests.files.items():
        path = out_dir / name
        path.write_text(
            "# Generated by `kiban render k8s`.\n" + dump_yaml(objects, all_documents=True),
            encoding="utf-8",
        )
        written.append(path)
    return written


def literal(value: str) -> str:
    """*value* with ``$(`` doubled, so the kubelet does not expand it as a variable."""
    return value.replace("$(", "$$(")


def _quantity_gib(n_bytes: int) -> str:
    return f"{max(1, math.ceil(n_bytes / GiB))}Gi"


class _Builder:
    def __init__(self, cfg: KibanConfig, options: K8sOptions, out: Manifests) -> None:
        self.cfg = cfg
        self.options = options
        self.out = out
        self.prefix = options.name

    # -- common ------------------------------------------------------------------------

    def labels(self, component: str, **extra: str) -> dict[str, str]:
        return {
            "app.kubernetes.io/name": "kiban",
            "app.kubernetes.io/instance": self.prefix,
            "app.kubernetes.io/component": component,
            **extra,
        }

    def meta(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "labels": labels}
        if self.options.namespace:
            meta["namespace"] = self.options.namespace
        return meta

    def secret_env(self, name: str, optional: bool) -> dict[str, Any]:
        ref = {"name": self.out.secret, "key": name, "optional": optional}
        return {"name": name, "valueFrom": {"secretKeyRef": ref}}

    @staticmethod
    def http_probe(path: str, period_s: int, failures: int, timeout_s: int = 5) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": "http"},
            "periodSeconds": period_s,
            "timeoutSeconds": timeout_s,
            "failureThreshold": failures,
        }

    def service(self, name: str, labels: dict[str, str], port: int) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.meta(name, labels),
            "spec": {
                "selector": labels,
                "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
            },
        }

    # -- gateway -----------------------------------------------------------------------

    def gateway(self, tree: dict[str, Any]) -> list[dict[str, Any]]:
        name = f"{self.prefix}-gateway"
        labels = self.labels("gateway")
        port = self.cfg.gateway.port
        config_map = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": self.meta(name, labels),
            "data": {"kiban.yaml": dump_config(tree, "# Generated by `kiban render k8s`.\n")},
        }
        mounts = [
            {"name": "config", "mountPath": str(Path(GATEWAY_CONFIG).parent), "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ]
        volumes: list[dict[str, Any]] = [
            {"name": "config", "configMap": {"name": name}},
            {"name": "tmp", "emptyDir": {}},
        ]
        if self.cfg.gateway.api_keys.file is not None:
            mounts.append(
                {
                    "name": "api-keys",
                    "mountPath": str(Path(GATEWAY_API_KEYS).parent),
                    "readOnly": True,
                }
            )
            items = [{"key": "api-keys", "path": Path(GATEWAY_API_KEYS).name}]
            volumes.append(
                {"name": "api-keys", "secret": {"secretName": self.out.secret, "items": items}}
            )
        env = [
            self.secret_env(var, optional)
            for var, optional in sorted(self.out.secret_keys.items())
            if var != "api-keys"
        ]
        container = {
            "name": "gateway",
            "image": self.options.gateway_image,
            "args": ["serve", "-c", GATEWAY_CONFIG],
            "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
            "env": env,
            # /health: the process answers. Not /ready (every route has a healthy engine):
            # that is the same for every replica, and taking all of them out of the Service
            # would turn kiban's OpenAI-shaped 503 into refused connections.
            "readinessProbe": self.http_probe("/health", 5, 3, 3),
            "livenessProbe": self.http_probe("/health", 15, 4, 5),
            "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": mounts,
        }
        deployment = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": self.meta(name, labels),
            "spec": {
                "replicas": self.options.replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": GATEWAY_UID,
                            "runAsGroup": GATEWAY_UID,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "affinity": _spread(labels),
                        "containers": [container],
                        "volumes": volumes,
                    },
                },
            },
        }
        return [config_map, deployment, self.service(name, labels, port)]

    # -- engines -----------------------------------------------------------------------

    def engine(self, engine: ContainerEngine, plan: Plan) -> list[dict[str, Any]]:
        name = engine.service
        labels = self.labels("engine", **{"kiban.dev/engine": name.removeprefix(self.prefix + "-")})
        claim = f"{name}-models"
        ep = plan.engine(engine.name)
        size = self.options.model_cache_size or _cache_size(ep.model.weights_bytes if ep else 0)
        pvc_spec: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": size}},
        }
        if self.options.storage_class:
            pvc_spec["storageClassName"] = self.options.storage_class
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": self.meta(claim, labels),
            "spec": pvc_spec,
        }
        resources: dict[str, Any] = {}
        if engine.gpus:
            resources["limits"] = {GPU_RESOURCE: str(len(engine.gpus))}
        elif ep is not None:
            resources["requests"] = {"memory": _quantity_gib(ep.share_bytes)}
        container: dict[str, Any] = {
            "name": "engine",
            "image": engine.image.image,
            "command": [literal(arg) for arg in engine.argv],
            "env": self.engine_env(engine),
            "ports": [{"name": "http", "containerPort": engine.port, "protocol": "TCP"}],
            "startupProbe": self.http_probe(
                engine.health_path,
                STARTUP_PERIOD_S,
                max(1, math.ceil(engine.ready_timeout_s / STARTUP_PERIOD_S)),
            ),
            "readinessProbe": self.http_probe(engine.health_path, 10, 3),
            "livenessProbe": self.http_probe(engine.health_path, 20, 3),
            "resources": resources,
            "volumeMounts": [{"name": "models", "mountPath": MODEL_CACHE}],
        }
        volumes: list[dict[str, Any]] = [
            {"name": "models", "persistentVolumeClaim": {"claimName": claim}}
        ]
        if engine.image.shm_size:
            container["volumeMounts"].append({"name": "shm", "mountPath": "/dev/shm"})
            volumes.append(
                {
                    "name": "shm",
                    "emptyDir": {"medium": "Memory", "sizeLimit": engine.image.shm_size},
                }
            )
        deployment = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": self.meta(name, labels),
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "terminationGracePeriodSeconds": math.ceil(engine.stop_grace_s),
                        "containers": [container],
                        "volumes": volumes,
                    },
                },
            },
        }
        return [pvc, deployment, self.service(name, labels, engine.port)]

    def engine_env(self, engine: ContainerEngine) -> list[dict[str, Any]]:
        """Secrets first (later values may name them as ``$(VAR)``), then kiban's values."""
        secrets: dict[str, bool] = dict.fromkeys(ENGINE_SECRETS, True)
        for value in engine.env_references.values():
            for match in ENV_REFERENCE.finditer(value):
                secrets[match.group(1)] = secrets.get(match.group(1), True) and bool(
                    match.group(2) is not None
                )
        for var, optional in secrets.items():
            self.out.secret_keys[var] = self.out.secret_keys.get(var, True) and optional
        env = [self.secret_env(var, optional) for var, optional in secrets.items()]
        taken = set(secrets)
        for key, value in engine.env.items():
            if key in taken:
                continue
            if key in engine.env_references:
                value = ENV_REFERENCE.sub(lambda m: f"$({m.group(1)})", engine.env_references[key])
            else:
                value = literal(value)
            env.append({"name": key, "value": value})
        return env

    # -- GPU exporter and monitoring ---------------------------------------------------

    def gpu_exporter(self) -> dict[str, Any]:
        name = f"{self.prefix}-gpu-exporter"
        labels = self.labels("gpu-exporter")
        port = self.cfg.observability.gpu_exporter_port
        container = {
            "name": "gpu-exporter",
            "image": self.options.gateway_image,
            "args": ["gpu-exporter", "--host", "0.0.0.0", "--port", str(port)],
            # every GPU of the node, without claiming one from the scheduler: the NVIDIA
            # container runtime reads these, as for NVIDIA's own dcgm-exporter
            "env": [
                {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
                {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "utility"},
            ],
            "ports": [{"name": "metrics", "containerPort": port, "protocol": "TCP"}],
            "readinessProbe": {
                "httpGet": {"path": "/metrics", "port": "metrics"},
                "periodSeconds": 15,
                "timeoutSeconds": 5,
            },
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            },
        }
        return {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": self.meta(name, labels),
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "nodeSelector": {GPU_NODE_LABEL: "true"},
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": GATEWAY_UID,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [container],
                    },
                },
            },
        }

    def monitoring(self, engines: list[ContainerEngine], exporter: bool) -> list[dict[str, Any]]:
        """ServiceMonitors (gateway, each engine), PodMonitor (GPU exporter), PrometheusRule.

        Targets get the job names and engine labels kiban's own scrape configuration
        gives them, so the alert rules and dashboards read the same series.
        """
        objects = [
            self.service_monitor(
                f"{self.prefix}-gateway", self.labels("gateway"), GATEWAY_JOB, "/metrics", {}
            )
        ]
        for engine in engines:
            if engine.metrics_path is None:
                continue
            short = engine.service.removeprefix(self.prefix + "-")
            selector = self.labels("engine", **{"kiban.dev/engine": short})
            target_labels = {k: v for k, v in engine.labels.items() if k != "gpu"}
            objects.append(
                self.service_monitor(
                    engine.service,
                    selector,
                    ENGINE_JOB_PREFIX + engine.name,
                    engine.metrics_path,
                    target_labels,
                    engine_index=True,
                )
            )
        if exporter:
            labels = self.labels("gpu-exporter")
            objects.append(
                {
                    "apiVersion": "monitoring.coreos.com/v1",
                    "kind": "PodMonitor",
                    "metadata": self.meta(f"{self.prefix}-gpu-exporter", labels),
                    "spec": {
                        "selector": {"matchLabels": labels},
                        "podMetricsEndpoints": [
                            {
                                "port": "metrics",
                                "path": "/metrics",
                                "relabelings": [_set_label("job", GPU_JOB)],
                            }
                        ],
                    },
                }
            )
        objects.append(self.prometheus_rule())
        return objects

    def service_monitor(
        self,
        name: str,
        selector: dict[str, str],
        job: str,
        path: str,
        target_labels: dict[str, str],
        *,
        engine_index: bool = False,
    ) -> dict[str, Any]:
        interval = f"{self.cfg.observability.scrape_interval_s:g}s"
        endpoint: dict[str, Any] = {
            "port": "http",
            "path": path,
            "interval": interval,
            "relabelings": [
                _set_label("job", job),
                *(_set_label(k, v) for k, v in target_labels.items()),
            ],
        }
        if engine_index:
            endpoint["metricRelabelings"] = [
                {"sourceLabels": ["exported_engine"], "targetLabel": "engine_index"},
                {"action": "labeldrop", "regex": "exported_engine"},
            ]
        return {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": self.meta(name, selector),
            "spec": {"selector": {"matchLabels": selector}, "endpoints": [endpoint]},
        }

    def prometheus_rule(self) -> dict[str, Any]:
        alerts = yaml.safe_load(ALERT_RULES.read_text(encoding="utf-8"))
        recording = engine_recording_rules(self.cfg.observability.scrape_interval_s)
        return {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": self.meta(f"{self.prefix}-rules", self.labels("rules")),
            "spec": {"groups": [*recording["groups"], *alerts["groups"]]},
        }


def _set_label(name: str, value: str) -> dict[str, Any]:
    return {"action": "replace", "targetLabel": name, "replacement": value}


def _spread(labels: dict[str, str]) -> dict[str, Any]:
    """Prefer gateway replicas on different nodes (not required: one node still works)."""
    term = {"labelSelector": {"matchLabels": labels}, "topologyKey": "kubernetes.io/hostname"}
    return {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": term}
            ]
        }
    }


def _cache_size(weights_bytes: int) -> str:
    """Room for the model's files with a margin (tokenizer, configs, a second format)."""
    return f"{max(MIN_CACHE_GIB, math.ceil(weights_bytes * 1.25 / GiB))}Gi"


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_name(name: str) -> str | None:
    """Why *name* cannot prefix kiban's object names, or None."""
    if not _DNS_SUBDOMAIN.match(name) or not name[0].isalpha() or len(name) > 40:
        return (
            f"--name {name!r}: expected lower-case letters, digits and '-', starting with a "
            "letter, at most 40 characters (it prefixes every object's name)"
        )
    return None
