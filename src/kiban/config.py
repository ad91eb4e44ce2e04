"""kiban.yaml: pydantic models, `${VAR}` substitution and errors that name the key.

Loading goes in three steps, each of which can fail with a :class:`ConfigError`
listing every problem as ``key.path: message (got VALUE)``:

1. YAML parsing;
2. ``${VAR}`` / ``${VAR:-default}`` substitution in every string value;
3. validation by the pydantic models below, then cross-references
   (routes name existing engines, public model names are unique).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kiban.cpulist import parse_cpu_list
from kiban.engines import ENGINE_KINDS
from kiban.errors import KibanError
from kiban.structured.validator import CompiledSchema, SchemaError

Strategy = Literal[
    "priority",
    "round_robin",
    "least_outstanding",
    "weighted",
    "ewma_latency",
    "cache_aware",
    "session",
]

_HTTP_URL = re.compile(r"^https?://[^/\s]+(/\S*)?$")
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(KibanError):
    """One or more problems in a configuration, each naming its key path."""

    def __init__(self, problems: list[str], source: str = "configuration") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))

    def summary(self) -> str:
        return f"{self.source} is invalid:"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiKeys(_Strict):
    """Where client API keys come from; never inline secrets."""

    env: list[str] = Field(default_factory=list, description="environment variables holding keys")
    file: Path | None = Field(
        default=None,
        description="keys file written by `kiban keys` (YAML, SHA-256 digests only), or one "
        "`sha256:<hex>` per line",
    )


class RateLimits(_Strict):
    """Per-key budgets, refilled continuously (token buckets over one minute)."""

    requests_per_minute: Annotated[int, Field(ge=1)] | None = None
    tokens_per_minute: Annotated[int, Field(ge=1)] | None = None

    @property
    def enabled(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


class ClientLimits(_Strict):
    """What the gateway's HTTP server allows a client connection (slow or flooding clients).

    ``header_timeout_s``: from the connection (or the first byte of a request)
    to the end of its headers; ``body_timeout_s``: from the end of the headers
    to the end of the body. A connection past either is closed.
    """

    header_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    body_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    #: longer than clients keep an idle connection pooled (httpx and the OpenAI SDK 5 s,
    #: aiohttp 15 s): the client lets it go first, instead of sending a request on a
    #: connection the server is closing (a reset, and the request lost). nginx uses 75 s.
    keepalive_timeout_s: Annotated[float, Field(gt=0)] = 75.0
    max_headers: Annotated[int, Field(ge=8, le=10_000)] = 100
    max_header_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024


class SharedState(_Strict):
    """Where gateway replicas share rate-limit counters and circuit-breaker state."""

    url: str = Field(description="redis://[user:password@]host:port/db, rediss://… or unix://…")
    prefix: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")] = "kiban"
    timeout_s: Annotated[float, Field(gt=0)] = 0.5

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not re.match(r"^(redis|rediss|unix)://\S+$", value):
            raise ValueError("expected a Redis URL such as redis://127.0.0.1:6379/0")
        return value


class GatewayConfig(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    workers: Annotated[int, Field(ge=1, le=256)] = 1
    api_keys: ApiKeys = Field(default_factory=ApiKeys)
    limits: RateLimits = Field(
        default_factory=RateLimits, description="per-key limits for keys without their own"
    )
    shared_state: SharedState | None = Field(
        default=None, description="Redis shared by replicas (a URL, or url/prefix/timeout_s)"
    )
    http: ClientLimits = Field(default_factory=ClientLimits)
    max_body_bytes: Annotated[int, Field(ge=1024)] = 32 * 1024 * 1024
    health_interval_s: Annotated[float, Field(gt=0)] = 5.0
    health_timeout_s: Annotated[float, Field(gt=0)] = 2.0
    #: read each engine's queue and KV use from its /metrics this often (off when unset)
    engine_load_interval_s: Annotated[float, Field(ge=0.5)] | None = None
    kv_avoid_ratio: Annotated[float, Field(gt=0, le=1)] = 0.9
    health_failures: Annotated[int, Field(ge=1)] = Field(
        default=3,
        description="consecutive failed health checks (timeout or non-200) before an engine "
        "leaves rotation; a refused connection takes it out at once",
    )
    shutdown_grace_s: Annotated[float, Field(gt=0)] = 30.0
    request_log: bool = True
    usage_flush_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=10.0, description="how often usage per key is written to its store"
    )

    @field_validator("shared_state", mode="before")
    @classmethod
    def _url_shorthand(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value


class CircuitConfig(_Strict):
    failures: Annotated[int, Field(ge=1)] = 3
    cooldown_s: Annotated[float, Field(gt=0)] = 5.0


class RestartPolicy(_Strict):
    """How the supervisor restarts a crashed engine: exponential backoff, bounded."""

    max_restarts: Annotated[int, Field(ge=0)] = 5
    backoff_s: Annotated[float, Field(gt=0)] = 1.0
    backoff_max_s: Annotated[float, Field(gt=0)] = 60.0
    reset_after_s: Annotated[float, Field(gt=0)] = 300.0


class LaunchConfig(_Strict):
    """A managed engine: kiban starts it (``kiban up``) instead of finding it running.

    ``context``, ``concurrency`` and ``kv_cache_dtype`` are what the user asks
    for; the planner turns them into each engine's own flags. ``args`` are
    appended verbatim after the planned flags (and win where an engine lets a
    later flag override an earlier one).
    """

    model: Annotated[str, Field(min_length=1, description="local path or hub name")]
    command: Annotated[list[str], Field(min_length=1)] | None = Field(
        default=None,
        description="kind openai only: the server's command line; {host}, {port}, {model} "
        "and {name} are filled in",
    )
    device: Literal["gpu", "cpu"] = "gpu"
    gpus: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0])
    cpus: str | None = Field(
        default=None,
        description="device cpu: the cores the engine's compute threads are bound to, as a "
        "Linux cpulist ('0-3,8'); by default kiban gives each CPU engine that pins its "
        "threads (vLLM) cores of its own when several run",
    )
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    context: Annotated[int, Field(ge=16)] | None = None
    concurrency: Annotated[int, Field(ge=1)] | None = None
    kv_cache_dtype: str = "auto"
    gpu_memory_gib: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="cap on the GPU memory this engine may take"
    )
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    image: Annotated[str, Field(min_length=1)] | None = Field(
        default=None,
        description="container image for kiban compose and kiban render k8s (default: the "
        "engine's official image at the version kiban pins)",
    )
    ready_timeout_s: Annotated[float, Field(gt=0)] = 900.0
    stop_grace_s: Annotated[float, Field(gt=0)] = 20.0
    restart: RestartPolicy = Field(default_factory=RestartPolicy)

    @field_validator("cpus")
    @classmethod
    def _cpu_list(cls, value: str | None) -> str | None:
        if value is not None:
            parse_cpu_list(value)  # ValueError names the part that is not a core list
        return value

    @property
    def cpu_cores(self) -> tuple[int, ...]:
        """``cpus`` as core numbers; empty when not set."""
        return parse_cpu_list(self.cpus) if self.cpus else ()


class GpuPolicy(_Strict):
    """GPU fail-fast: ``require`` defaults to true whenever an engine runs on a GPU."""

    require: bool | None = None
    min_free_mib: Annotated[int, Field(ge=0)] = 0


class GpuInventory(_Strict):
    """A GPU for planning where NVML cannot see it: a known type or a memory size.

    ``type`` is a name from kiban's GPU catalogue (``rtx4090``, ``h100-80``, ...);
    ``memory`` a size (``24GiB``, ``23028MiB``); ``compute_capability`` like ``8.9``.
    """

    index: Annotated[int, Field(ge=0)]
    type: str | None = None
    memory: str | int | None = None
    compute_capability: str | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str | None) -> str | None:
        from kiban.sizing.catalogue import find_gpu, gpu_keys

        if value is not None and find_gpu(value) is None:
            raise ValueError(f"unknown GPU type; expected one of {', '.join(gpu_keys())}")
        return value

    @field_validator("memory")
    @classmethod
    def _size(cls, value: str | int | None) -> str | int | None:
        from kiban.sizing.units import parse_size

        if value is not None:
            parse_size(value)
        return value

    @field_validator("compute_capability")
    @classmethod
    def _capability(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+\.\d", value):
            raise ValueError("expected MAJOR.MINOR such as 8.9")
        return value

    @model_validator(mode="after")
    def _type_or_memory(self) -> GpuInventory:
        if self.type is None and self.memory is None:
            raise ValueError("give the GPU's type (e.g. rtx4090) or its memory (e.g. 24GiB)")
        return self


class PlanningConfig(_Strict):
    """How `kiban plan` shares memory out.

    ``reserve_fraction`` of each GPU (and of host memory for CPU engines) is
    left unplanned for the driver, the desktop and other processes.
    """

    reserve_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.03


class EngineConfig(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    kind: str
    url: str
    models: Annotated[list[str], Field(min_length=1)]
    weight: Annotated[float, Field(gt=0)] = 1.0
    max_concurrency: Annotated[int, Field(ge=1)] = 256
    max_queue: Annotated[int, Field(ge=0)] = Field(
        default=0, description="requests that may wait for a free slot (0: answer 429 at once)"
    )
    queue_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    images: bool | None = Field(default=None, description="accepts image inputs (VLM)")
    api_key: str | None = Field(default=None, description="key sent to the engine")
    circuit: CircuitConfig = Field(default_factory=CircuitConfig)
    launch: LaunchConfig | None = None
    context: Annotated[int, Field(ge=16)] | None = Field(
        default=None,
        description="tokens of context the engine serves (for failover; a launched engine "
        "has launch.context)",
    )
    version: str | None = Field(
        default=None, description="engine release (selects its API dialect), e.g. 0.11.2"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="engine-specific settings (see the engine kind)"
    )

    @model_validator(mode="before")
    @classmethod
    def _url_from_launch_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and "url" not in data:
            launch = data.get("launch")
            if isinstance(launch, dict) and isinstance(launch.get("port"), int):
                return {**data, "url": f"http://127.0.0.1:{launch['port']}"}
        return data

    @property
    def planned_context(self) -> int | None:
        """The context the engine serves, when the configuration says."""
        if self.context is not None:
            return self.context
        return self.launch.context if self.launch is not None else None

    @property
    def port(self) -> int:
        """The TCP port of ``url`` (explicit, or the scheme's default)."""
        parsed = urlsplit(self.url)
        return parsed.port or (443 if parsed.scheme == "https" else 80)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value not in ENGINE_KINDS:
            raise ValueError(f"unknown engine kind; expected one of {', '.join(ENGINE_KINDS)}")
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        from kiban.engines.kind import parse_version

        if value is not None and parse_version(value) is None:
            raise ValueError("expected a release number such as 0.11.2")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not _HTTP_URL.match(value):
            raise ValueError("expected an http:// or https:// URL such as http://127.0.0.1:8000")
        return value.rstrip("/")


class Timeouts(_Strict):
    """Per attempt, in seconds (docs/reliability.md).

    ``connect_s``: the TCP connection; ``ttft_s``: a stream's first event, from the
    start of the attempt; ``idle_s``: the longest silence between two events of a
    stream (``null``: none); ``total_s``: the whole exchange with one engine, which
    for a non-streamed request is the only bound on waiting for its answer.
    """

    connect_s: Annotated[float, Field(gt=0)] = 3.0
    ttft_s: Annotated[float, Field(gt=0)] = 30.0
    idle_s: Annotated[float, Field(gt=0)] | None = 30.0
    total_s: Annotated[float, Field(gt=0)] = 600.0

    @model_validator(mode="before")
    @classmethod
    def _no_first_byte(cls, data: Any) -> Any:
        if isinstance(data, dict) and "first_byte_s" in data:
            raise ValueError(
                "first_byte_s is no longer a setting: use "
                "ttft_s for the first event of a stream and total_s for a whole answer"
            )
        return data


class FailoverPolicy(_Strict):
    """Which failures move a request to another engine, or try the same one again.

    ``context_length``: an engine that refuses a prompt as too long for its context
    passes the request on, never back to itself: ``larger`` to the engines whose
    context (``engines[].context`` or ``launch.context``) is larger first, ``next`` in
    the route's order, ``off`` not at all (the refusal goes to the client).
    ``same_engine_retries``: after a 5xx, a 429 or a connection error, the tries on the
    same engine before the next one, after ``same_engine_backoff_s`` (doubling, with
    jitter) or the engine's Retry-After. Other 4xx (a content-policy refusal, a bad
    request) go to the client as they are.
    """

    context_length: Literal["larger", "next", "off"] = "larger"
    same_engine_retries: Annotated[int, Field(ge=0, le=5)] = 1
    same_engine_backoff_s: Annotated[float, Field(ge=0, le=60)] = 0.25


class Retries(_Strict):
    attempts: Annotated[int, Field(ge=1, le=10)] = 3
    budget_ratio: Annotated[float, Field(ge=0, le=1)] = 0.2
    min_retries_per_s: Annotated[float, Field(ge=0)] = 2.0
    backoff_s: Annotated[float, Field(ge=0)] = 0.02


class RouteTarget(_Strict):
    """One engine of a route, with the model name the engine knows it by."""

    engine: str
    model: str | None = None


class StructuredPolicy(_Strict):
    """How a route handles structured output.

    ``schema`` makes the route an extractor: every request gets this JSON
    Schema without sending it. ``unenforced`` decides what happens when no
    engine of the route enforces all of a request's constraint: ``validate``
    (the engine enforces what it can, kiban validates the answer against the
    whole schema and retries) or ``refuse`` (400 naming the feature).
    ``retries`` more attempts follow an invalid output, on the best enforcing
    engines in turn or on the same one (``retry_on``). ``default_max_tokens``
    is what a request without ``max_tokens`` gets: ``auto`` (from the schema)
    or a number.
    """

    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")] = "response"
    unenforced: Literal["validate", "refuse"] = "validate"
    retries: Annotated[int, Field(ge=0, le=5)] = 2
    retry_on: Literal["next", "same"] = "next"
    default_max_tokens: Literal["auto"] | int = "auto"
    whitespace_run: Annotated[int, Field(ge=8)] = 64

    @field_validator("default_max_tokens", mode="before")
    @classmethod
    def _auto_or_tokens(cls, value: Any) -> Any:
        if value == "auto" or (type(value) is int and value >= 1):
            return value
        raise ValueError("expected 'auto' or a number of tokens of at least 1")


CACHE_AWARE_MAX_ENGINES = 64


class CacheAwarePolicy(_Strict):
    """``strategy: cache_aware``: prefix index size and the balance guard (docs/routing.md)."""

    min_match: Annotated[float, Field(gt=0, le=1)] = 0.2
    balance_abs: Annotated[int, Field(ge=0)] = 4
    balance_rel: Annotated[float, Field(ge=1)] = 1.5
    max_prefixes: Annotated[int, Field(ge=16, le=10_000_000)] = 32768


class SessionPolicy(_Strict):
    """``strategy: session``: where the session key comes from and the load bound."""

    key: Literal["header", "user", "prompt_cache_key"] = "header"
    header: Annotated[str, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")] = "X-Session-ID"
    load_factor: Annotated[float, Field(ge=1)] = 1.25
    min_bound: Annotated[int, Field(ge=1)] = 4


class RouteConfig(_Strict):
    model: Annotated[str, Field(min_length=1)]
    aliases: list[str] = Field(default_factory=list)
    engines: Annotated[list[RouteTarget], Field(min_length=1)]
    strategy: Strategy = "priority"
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retries: Retries = Field(default_factory=Retries)
    failover: FailoverPolicy = Field(default_factory=FailoverPolicy)
    structured: StructuredPolicy = Field(default_factory=StructuredPolicy)
    #: a stream whose engine breaks after tokens reached the client continues on another
    #: engine of the route (gateway/continuation.py); False: it ends with an error event
    continue_streams: bool = True
    cache_aware: CacheAwarePolicy = Field(default_factory=CacheAwarePolicy)
    session: SessionPolicy = Field(default_factory=SessionPolicy)

    @field_validator("engines", mode="before")
    @classmethod
    def _names_to_targets(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"engine": v} if isinstance(v, str) else v for v in value]
        return value

    @property
    def public_names(self) -> list[str]:
        return [self.model, *self.aliases]


class ObservabilityConfig(_Strict):
    """Where Prometheus runs and how kiban's generated scrape configuration reads the stack.

    ``gpu_exporter``: ``gateway`` puts the NVML GPU metrics on the gateway's own
    /metrics; ``standalone`` scrapes ``kiban gpu-exporter`` on ``gpu_exporter_port``;
    ``off`` leaves GPUs out.
    """

    prometheus_url: str = "http://127.0.0.1:9090"
    scrape_interval_s: Annotated[float, Field(ge=1, le=300)] = 15.0
    gpu_exporter: Literal["gateway", "standalone", "off"] = "gateway"
    gpu_exporter_port: Annotated[int, Field(ge=1, le=65535)] = 9835
    metrics_key_file: Path | None = Field(
        default=None,
        description="file holding an admin API key, with which the rendered Prometheus "
        "configuration scrapes the private per-key series from the gateway's /admin/metrics",
    )

    @field_validator("prometheus_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not _HTTP_URL.match(value):
            raise ValueError("expected an http:// or https:// URL such as http://127.0.0.1:9090")
        return value.rstrip("/")


class KibanConfig(_Strict):
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    gpu: GpuPolicy = Field(default_factory=GpuPolicy)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)

    gpus: list[GpuInventory] = Field(default_factory=list)
    planning: PlanningConfig = Field(default_factory=PlanningConfig)
    engines: Annotated[list[EngineConfig], Field(min_length=1)]
    routes: Annotated[list[RouteConfig], Field(min_length=1)]

    def engine(self, name: str) -> EngineConfig:
        return next(e for e in self.engines if e.name == name)


def substitute_env(tree: Any, env: Mapping[str, str], path: str = "") -> tuple[Any, list[str]]:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of *tree*."""
    problems: list[str] = []

    def visit(node: Any, where: str) -> Any:
        if isinstance(node, dict):
            return {k: visit(v, _join(where, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [visit(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            return ENV_REFERENCE.sub(lambda m: _lookup(m, env, where, problems), node)
        return node

    return visit(tree, path), problems


def _lookup(match: re.Match[str], env: Mapping[str, str], where: str, problems: list[str]) -> str:
    name, default = match.group(1), match.group(2)
    if name in env:
        return env[name]
    if default is not None:
        return default
    problems.append(f"{where or '<root>'}: environment variable {name} is not set")
    return ""


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _loc_to_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, part)
    return out or "<root>"


def _lookup_value(tree: Any, loc: Iterable[Any]) -> tuple[bool, Any]:
    node = tree
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, node


def _describe_validation(err: ValidationError, raw: Any) -> list[str]:
    problems = []
    for item in err.errors():
        loc = [p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "literal_error":
            msg = "expected one of " + item["ctx"]["expected"].replace("'", "")
        elif item["type"] == "extra_forbidden":
            msg = "unknown key"
        elif item["type"] == "missing":
            msg = "required key is missing"
            if loc[-1:] == ["url"] and loc[:1] == ["engines"]:
                msg += " (or give a launch section with launch.port)"
        found, value = _lookup_value(raw, loc)
        shown = f" (got {value!r})" if found and item["type"] != "extra_forbidden" else ""
        problems.append(f"{_loc_to_path(loc)}: {msg}{shown}")
    return problems


def _check_launch(key: str, engine: EngineConfig) -> list[str]:
    assert engine.launch is not None
    problems = []
    takes_command = (
        launcher := ENGINE_KINDS[engine.kind].launcher
    ) is not None and launcher.takes_command
    if takes_command and engine.launch.command is None:
        problems.append(
            f"{key}.launch.command: required for kind {engine.kind!r} (the server's command "
            "line; {host}, {port}, {model} and {name} are filled in)"
        )
    if not takes_command and engine.launch.command is not None:
        problems.append(
            f"{key}.launch.command: kind {engine.kind!r} is launched by kiban from "
            "launch.model; only kind 'openai' takes a command (remove it, or use launch.args)"
        )
    return problems


def _cross_check(cfg: KibanConfig) -> list[str]:
    problems: list[str] = []
    seen_engines: dict[str, int] = {}
    for i, engine in enumerate(cfg.engines):
        if engine.name in seen_engines:
            problems.append(
                f"engines[{i}].name: duplicate engine name {engine.name!r} "
                f"(also engines[{seen_engines[engine.name]}])"
            )
        seen_engines.setdefault(engine.name, i)
        for key, problem in ENGINE_KINDS[engine.kind].option_problems(engine):
            problems.append(f"engines[{i}].{key}: {problem}")
        if engine.launch is not None:
            problems += _check_launch(f"engines[{i}]", engine)
            if engine.context is not None and engine.launch.context not in (None, engine.context):
                problems.append(
                    f"engines[{i}].context: {engine.context} differs from launch.context "
                    f"{engine.launch.context}; give one of them"
                )

    seen_gpus: dict[int, int] = {}
    for i, gpu in enumerate(cfg.gpus):
        if gpu.index in seen_gpus:
            problems.append(
                f"gpus[{i}].index: GPU {gpu.index} is already described by "
                f"gpus[{seen_gpus[gpu.index]}]"
            )
        seen_gpus.setdefault(gpu.index, i)
    public: dict[str, str] = {}
    for r, route in enumerate(cfg.routes):
        for policy in ("cache_aware", "session"):
            if policy in route.model_fields_set and route.strategy != policy:
                problems.append(
                    f"routes[{r}].{policy}: settings of strategy {policy!r}, but the route's "
                    f"strategy is {route.strategy!r}"
                )
        if route.strategy == "cache_aware" and len(route.engines) > CACHE_AWARE_MAX_ENGINES:
            problems.append(
                f"routes[{r}].engines: a cache_aware route takes at most "
                f"{CACHE_AWARE_MAX_ENGINES} engines (its index holds a 64-bit mask), "
                f"not {len(route.engines)}"
            )
        schema = route.structured.schema_
        if schema is not None:
            try:
                CompiledSchema(schema)
            except SchemaError as err:
                problems.append(f"routes[{r}].structured.schema: not a valid JSON Schema: {err}")
        for n, name in enumerate(route.public_names):
            key = f"routes[{r}].model" if n == 0 else f"routes[{r}].aliases[{n - 1}]"
            if name in public:
                problems.append(f"{key}: model name {name!r} is already served by {public[name]}")
            public.setdefault(name, key)
        for t, target in enumerate(route.engines):
            key = f"routes[{r}].engines[{t}]"
            if target.engine not in seen_engines:
                problems.append(
                    f"{key}.engine: unknown engine {target.engine!r}; "
                    f"expected one of {', '.join(seen_engines) or '(none defined)'}"
                )
                continue
            served = cfg.engine(target.engine).models
            if target.model is not None and target.model not in served:
                problems.append(
                    f"{key}.model: engine {target.engine!r} does not serve {target.model!r}; "
                    f"it serves {', '.join(served)}"
                )
    return problems


def _resolve_paths(tree: dict[str, Any], base_dir: Path) -> None:
    """Relative paths in the file mean relative to the file (not to the current directory).

    ``launch.model`` counts as a path when it starts with ``./`` or ``../`` (otherwise
    it may be a hub name such as ``Qwen/Qwen2.5-7B-Instruct``); ``api_keys.file`` and
    ``observability.metrics_key_file`` always.
    """
    for engine in tree.get("engines") or []:
        launch = engine.get("launch") if isinstance(engine, dict) else None
        model = launch.get("model") if isinstance(launch, dict) else None
        if isinstance(launch, dict) and isinstance(model, str) and model.startswith(("./", "../")):
            launch["model"] = str((base_dir / model).resolve())
    keys = (
        (tree.get("gateway") or {}).get("api_keys")
        if isinstance(tree.get("gateway"), dict)
        else None
    )
    if isinstance(keys, dict) and isinstance(keys.get("file"), str):
        keys["file"] = str((base_dir / keys["file"]).resolve())
    obs = tree.get("observability")
    if isinstance(obs, dict) and isinstance(obs.get("metrics_key_file"), str):
        obs["metrics_key_file"] = str((base_dir / obs["metrics_key_file"]).resolve())


def parse_config(
    raw: Any,
    env: Mapping[str, str] | None = None,
    source: str = "config",
    base_dir: Path | None = None,
) -> KibanConfig:
    """Validate an already-parsed YAML/JSON tree (relative paths against *base_dir*)."""
    if not isinstance(raw, dict):
        raise ConfigError([f"<root>: expected a mapping (got {type(raw).__name__})"], source)
    tree, problems = substitute_env(raw, os.environ if env is None else env)
    if problems:
        raise ConfigError(problems, source)
    if base_dir is not None:
        _resolve_paths(tree, base_dir)
    try:
        cfg = KibanConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe_validation(err, tree), source) from None
    problems = _cross_check(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(
    path: str | Path, env: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> KibanConfig:
    """Read, substitute and validate a kiban.yaml file.

    Relative paths in it are relative to *base_dir*, by default the file's folder
    (a copy of a configuration elsewhere passes the original's folder).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"cannot read file: {err.strerror}"], str(path)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError([f"{where}invalid YAML: {problem}"], str(path)) from None
    return parse_config(raw, env, str(path), base_dir=base_dir or path.resolve().parent)


def resolve_target_model(cfg: KibanConfig, route: RouteConfig, target: RouteTarget) -> str:
    """The model name to send to *target*'s engine for *route*."""
    if target.model is not None:
        return target.model
    served = cfg.engine(target.engine).models
    for name in route.public_names:
        if name in served:
            return name
    return served[0]
