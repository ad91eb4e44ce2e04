"""The container view of a kiban.yaml: what `kiban compose` and `kiban render k8s` run.

For every managed engine (one with a ``launch`` section): its image (the engine's
official one at the version kiban pins, or ``launch.image``), the exact command
line `kiban up` would run (:func:`kiban.deploy.launch.engine_argv` with the
plan's flags), listening on every interface of its container, the environment
kiban adds, the GPUs the plan gives it and where its model comes from.

For the gateway: a kiban.yaml in which managed engines are addressed by their
service names, written from the file as written (not as loaded), so ``${VAR}``
references stay references and are resolved inside the gateway's container.
Keys kiban does not rewrite (``gateway.shared_state`` included) pass through.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from kiban.config import ENV_REFERENCE, EngineConfig, KibanConfig
from kiban.deploy.launch import engine_argv, engine_extra_env
from kiban.engines import ENGINE_KINDS
from kiban.engines.launch import ContainerImage, ContainerTarget, LaunchUnsupported
from kiban.errors import KibanError
from kiban.observability.scrape import engine_labels
from kiban.sizing.plan import Plan

#: where engine images keep the Hugging Face cache (they run as root; the engines' docs
#: mount the host's cache there)
MODEL_CACHE = "/root/.cache/huggingface"
#: where a model on the host's disk is mounted, read-only, under its own file name
LOCAL_MODELS = "/models"
#: where the gateway's container finds its kiban.yaml and the API key file
GATEWAY_CONFIG = "/etc/kiban/kiban.yaml"
GATEWAY_API_KEYS = "/etc/kiban/secrets/api-keys"
#: secrets the engines may need and take from the environment that starts them
ENGINE_SECRETS = ("HF_TOKEN",)
LISTEN_ALL = "0.0.0.0"
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "[::1]"}
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class ContainerError(KibanError):
    """The configuration cannot run in containers; each problem names the engine or key."""

    exit_code = 1
    headline = "the configuration cannot run in containers:"

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class LocalModel:
    """A model file or folder on the host, mounted read-only into the engine's container."""

    host_path: Path
    container_path: str


@dataclass(frozen=True)
class ContainerEngine:
    """One managed engine as a container: image, command, environment, devices, probes."""

    name: str
    service: str
    kind: str
    image: ContainerImage
    argv: list[str]
    env: dict[str, str]
    port: int
    device: str
    gpus: tuple[int, ...]
    health_path: str
    metrics_path: str | None
    local_model: LocalModel | None
    ready_timeout_s: float
    stop_grace_s: float
    max_restarts: int
    labels: dict[str, str] = field(default_factory=dict)
    #: launch.env keys whose written value holds ``${VAR}`` references, with that value
    env_references: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """How the gateway (and Prometheus) reach the engine on the container network."""
        return f"http://{self.service}:{self.port}"

    @property
    def health_url(self) -> str:
        """The health endpoint as seen from inside the engine's own container."""
        return f"http://127.0.0.1:{self.port}{self.health_path}"


def dns_name(name: str) -> str:
    """*name* as a DNS label (RFC 1035): lower case, letters, digits and '-', 63 at most."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not label or not label[0].isalpha():
        label = "e-" + label
    return label[:63].rstrip("-")


def service_names(cfg: KibanConfig, prefix: str, reserved: tuple[str, ...]) -> dict[str, str]:
    """A DNS-safe service name for every managed engine; ContainerError on a clash."""
    names: dict[str, str] = {}
    problems = []
    taken = {name: f"kiban's own {name!r} service" for name in reserved}
    for i, engine in enumerate(cfg.engines):
        if engine.launch is None:
            continue
        service = dns_name(f"{prefix}{engine.name}")
        if not _DNS_LABEL.match(service):
            problems.append(f"engines[{i}].name: {engine.name!r} makes no valid service name")
        elif service in taken:
            problems.append(
                f"engines[{i}].name: {engine.name!r} becomes service {service!r}, which is "
                f"already {taken[service]}; rename the engine"
            )
        taken.setdefault(service, f"engine {engine.name!r}")
        names[engine.name] = service
    if problems:
        raise ContainerError(problems)
    return names


def container_image(engine: EngineConfig) -> ContainerImage:
    """The engine kind's official image for its device, or ``launch.image`` in its place."""
    assert engine.launch is not None
    kind = ENGINE_KINDS[engine.kind]
    try:
        image = kind.container_image(engine.launch.device)
    except LaunchUnsupported:
        if engine.launch.image is None:
            raise
        # an image kiban knows nothing about: its command is launch.command, and it may
        # have no HTTP client for a healthcheck
        return ContainerImage(image=engine.launch.image, health_tool=())
    if engine.launch.image is not None:
        return ContainerImage(**{**image.__dict__, "image": engine.launch.image, "source": ""})
    return image


def is_loopback_url(url: str) -> bool:
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or "") in _LOOPBACK


def _local_model(engine: EngineConfig) -> LocalModel | None:
    """A model path on this machine (kiban.yaml's ./relative paths are resolved to absolute)."""
    assert engine.launch is not None
    model = engine.launch.model
    if not model.startswith("/"):
        return None  # a hub name: the engine downloads it into the model cache volume
    path = Path(model)
    return LocalModel(path, f"{LOCAL_MODELS}/{path.name}")


def container_engines(
    cfg: KibanConfig, plan: Plan, services: dict[str, str], raw: dict[str, Any] | None = None
) -> list[ContainerEngine]:
    """Every managed engine of *cfg* as a container; ContainerError lists what cannot run.

    *plan* must fit (its problems are reported as they are); *raw* is the file as
    written, for launch.env values that reference ``${VAR}``.
    """
    problems = list(plan.problems)
    engines = []
    raw_engines = (raw or {}).get("engines") or []
    for i, engine in enumerate(cfg.engines):
        if engine.launch is None:
            continue
        try:
            image = container_image(engine)
        except LaunchUnsupported as err:
            problems.append(f"engine {engine.name!r}: {err}")
            continue
        container = _container_engine(engine, image, plan, services[engine.name])
        raw_env = _raw_launch_env(raw_engines, i)
        references = {k: v for k, v in raw_env.items() if isinstance(v, str) and "${" in v}
        engines.append(replace(container, env_references=references))
    if problems:
        raise ContainerError(problems)
    return engines


def _raw_launch_env(raw_engines: list[Any], index: int) -> dict[str, Any]:
    if index >= len(raw_engines) or not isinstance(raw_engines[index], dict):
        return {}
    launch = raw_engines[index].get("launch")
    env = launch.get("env") if isinstance(launch, dict) else None
    return env if isinstance(env, dict) else {}


def _container_engine(
    engine: EngineConfig, image: ContainerImage, plan: Plan, service: str
) -> ContainerEngine:
    assert engine.launch is not None
    kind = ENGINE_KINDS[engine.kind]
    local = _local_model(engine)
    inside = engine
    if local is not None:
        launch = engine.launch.model_copy(update={"model": local.container_path})
        inside = engine.model_copy(update={"launch": launch})
    ep = plan.engine(engine.name)  # None: nothing to plan (kind openai's own command)
    target = ContainerTarget(
        env_root=None, host=LISTEN_ALL, port=engine.port, programs=image.programs
    )
    argv = engine_argv(inside, target, ep.flags if ep is not None else [])
    # devices come from the container's GPU reservation, not CUDA_VISIBLE_DEVICES by UUID
    device = {"CUDA_VISIBLE_DEVICES": ""} if engine.launch.device == "cpu" else {}
    env = engine_extra_env(engine, ep.env if ep is not None else {}, device)
    if local is None:
        env.setdefault("HF_HOME", MODEL_CACHE)
    gpus = ep.gpus if ep is not None else tuple(engine.launch.gpus)
    return ContainerEngine(
        name=engine.name,
        service=service,
        kind=engine.kind,
        image=image,
        argv=argv,
        env=env,
        port=engine.port,
        device=engine.launch.device,
        gpus=() if engine.launch.device == "cpu" else tuple(gpus),
        health_path=kind.dialect.health_path,
        metrics_path=kind.metrics.path,
        local_model=local,
        ready_timeout_s=engine.launch.ready_timeout_s,
        stop_grace_s=engine.launch.stop_grace_s,
        max_restarts=engine.launch.restart.max_restarts,
        labels=engine_labels(engine),
    )


# -- the gateway's kiban.yaml ------------------------------------------------------------


def load_raw(path: Path) -> dict[str, Any]:
    """kiban.yaml as written (no ``${VAR}`` substitution), for the gateway's copy."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return raw if isinstance(raw, dict) else {}


def gateway_config(
    raw: dict[str, Any],
    engine_urls: dict[str, str],
    *,
    loopback_host: str | None,
    api_keys_path: str | None,
    observability: dict[str, Any],
) -> dict[str, Any]:
    """The gateway container's kiban.yaml, from the file as written.

    Managed engines get their service URL and lose ``launch`` (the gateway only
    routes to them); unmanaged engines on this machine's loopback are reached
    through *loopback_host* (None: they cannot be, a ContainerError names them);
    the gateway listens on every interface of its container; ``api_keys.file``
    becomes *api_keys_path*; *observability* replaces keys of ``observability``.
    """
    tree = copy.deepcopy(raw)
    gateway = tree.setdefault("gateway", {}) or {}
    tree["gateway"] = gateway
    gateway["host"] = LISTEN_ALL
    keys = gateway.get("api_keys")
    if isinstance(keys, dict) and keys.get("file") is not None:
        keys["file"] = api_keys_path
    problems = []
    for i, engine in enumerate(tree.get("engines") or []):
        name = engine.get("name")
        if name in engine_urls:
            engine["url"] = engine_urls[name]
            engine.pop("launch", None)
        elif isinstance(engine.get("url"), str) and is_loopback_url(engine["url"]):
            if loopback_host is None:
                problems.append(
                    f"engines[{i}].url: {engine['url']} is this machine's loopback, which "
                    "the gateway cannot reach from the cluster; give an address the cluster "
                    "reaches, or a launch section so kiban runs the engine there"
                )
            else:
                engine["url"] = _replace_host(engine["url"], loopback_host)
    if problems:
        raise ContainerError(problems)
    tree.pop("gpus", None)  # planning happened when the files were rendered
    tree["observability"] = {**(tree.get("observability") or {}), **observability}
    return tree


def _replace_host(url: str, host: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def env_references(tree: Any) -> dict[str, bool]:
    """``${VAR}`` names used anywhere in *tree*: name -> whether every use has a default."""
    found: dict[str, bool] = {}

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)
        elif isinstance(node, str):
            for match in ENV_REFERENCE.finditer(node):
                has_default = match.group(2) is not None
                found[match.group(1)] = found.get(match.group(1), True) and has_default

    visit(tree)
    return found


class _PlainDumper(yaml.SafeDumper):
    """YAML without anchors and aliases (objects that share a mapping repeat it)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any, *, all_documents: bool = False) -> str:
    """Block-style YAML in the order given, without anchors."""
    if all_documents:
        return yaml.dump_all(
            data, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True, width=100
        )
    return yaml.dump(data, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True, width=100)


def dump_config(tree: dict[str, Any], header: str) -> str:
    return header + dump_yaml(tree)
