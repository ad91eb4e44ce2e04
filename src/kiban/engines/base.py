"""The small interface every engine kind implements.

Everything that differs between engines lives in one module per kind; the
gateway only talks to :class:`EngineKind`. Later capabilities (structured
output dialect, launch command, KV-cache planning, metrics names) are added
here as methods with a default, and overridden where an engine differs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from kiban.gateway.errors import error_body
from kiban.planning.kv import KvFormat, KvNeed, blocks, kv_need
from kiban.planning.specs import ModelSpec
from kiban.planning.target import PlanRefusal, PlanTarget
from kiban.structured.capability import StructuredCapability
from kiban.structured.constraint import Constraint
from kiban.structured.verify import OutputFailure

if TYPE_CHECKING:
    from kiban.config import EngineConfig
    from kiban.planning.plan import EnginePlan

_VERSION = re.compile(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``"0.11.2"`` -> ``(0, 11, 2)``; ``"v0.10.2rc1"`` -> ``(0, 10, 2)``; None if not a version."""
    match = _VERSION.match(text.strip())
    if match is None:
        return None
    major, minor, patch = (int(g or 0) for g in match.groups())
    return major, minor, patch


@dataclass(frozen=True)
class EngineOption:
    """An engine-specific key of ``engines[].options``: its accepted values and default."""

    name: str
    choices: tuple[str, ...]
    default: str
    help: str = ""


class LaunchUnsupported(Exception):
    """kiban cannot start this engine kind (or not on this device); the message says why."""


@dataclass(frozen=True)
class LaunchTarget:
    """Where a managed engine runs: its environment's root, and the address to listen on."""

    env_root: Path | None  # None for engines that run from the system (kind openai)
    host: str
    port: int

    def program(self, name: str) -> str:
        """Path of an executable in the engine's environment (``bin/<name>``)."""
        if self.env_root is None:
            raise LaunchUnsupported(f"no engine environment to run {name!r} from")
        return str(self.env_root / "bin" / name)


@dataclass(frozen=True)
class ContainerImage:
    """An engine's official image, pinned, and what kiban's command needs to run in it.

    ``programs`` maps a program name of `EngineKind.launch_argv` (``python``,
    ``llama-server``, ...) to what runs it inside the image; kiban sets the
    container's entrypoint to its own command line, so the image's own
    ENTRYPOINT does not matter. ``health_tool`` is an HTTP client present in
    the image (for Compose healthchecks). ``ipc_host``: the engine's docs run
    it with ``--ipc=host`` (PyTorch shares tensors between processes through
    /dev/shm); ``shm_size`` is the shared memory to give it where the host's
    IPC namespace cannot be shared (Kubernetes). ``source`` names the files
    these facts were read from.
    """

    image: str
    programs: dict[str, str] = field(default_factory=dict)
    health_tool: tuple[str, ...] = ("curl", "-fsS", "-o", "/dev/null")
    ipc_host: bool = False
    shm_size: str | None = None
    ulimits: dict[str, int | dict[str, int]] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class ContainerTarget(LaunchTarget):
    """A launch inside a container: programs come from the image, not an environment."""

    programs: dict[str, str] = field(default_factory=dict)

    def program(self, name: str) -> str:
        return self.programs.get(name, name)


@dataclass(frozen=True)
class StartupReport:
    """What an engine's start-up log says about itself (None where it says nothing).

    ``device`` is where the engine put its model, as the engine reports it
    (``"cuda"``, ``"cpu"``); the GPU policy uses it where NVML cannot see
    processes (WSL2). ``errors`` are log lines that explain a failed start.
    """

    kv_cache_tokens: int | None = None
    kv_cache_bytes: int | None = None
    device: str | None = None
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EngineMetricNames:
    """An engine's own Prometheus series for the signals kiban charts and alerts on.

    None where the engine exports nothing for the signal. kiban's recording
    rules (:mod:`kiban.observability.scrape`) map these onto one set of
    ``kiban:engine_*`` series, so dashboards and alerts work for every kind.
    """

    #: gauge, share of the KV cache in use, 0 to 1
    kv_cache_usage: str | None = None
    #: gauge, requests being processed (in the running batch)
    requests_running: str | None = None
    #: gauge, requests queued inside the engine
    requests_waiting: str | None = None
    #: counter, prompt (prefill) tokens processed
    prompt_tokens: str | None = None
    #: counter, generated tokens
    generation_tokens: str | None = None
    #: histogram (base name), time to first token in seconds
    ttft: str | None = None


@dataclass(frozen=True)
class TokenCount:
    """How an engine reports, on every streamed event, the tokens it has generated so far.

    The request *fields* ask for it (a dict value is merged into the request's own);
    each event then carries ``{key: {count: n, ...}}``. The gateway reads it to know
    exactly how many tokens a broken stream had sent (an engine may put several in
    one event) and keeps it from a client that did not ask for it.
    """

    fields: dict[str, Any]
    key: str
    count: str

    def ask(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """*payload* with the fields added; None when the client had asked for them itself."""
        asked = dict(payload)
        for name, value in self.fields.items():
            current = payload.get(name)
            asked[name] = {**current, **value} if isinstance(current, dict) else value
        return None if all(asked[name] == payload.get(name) for name in self.fields) else asked


#: the usage on every event that vLLM and SGLang send for ``stream_options.continuous_usage_stats``
CONTINUOUS_USAGE = TokenCount(
    {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    "usage",
    "completion_tokens",
)


class EngineKind:
    """Defaults follow the OpenAI-compatible servers most engines ship."""

    name: ClassVar[str]
    chat_path: ClassVar[str] = "/v1/chat/completions"
    completions_path: ClassVar[str] = "/v1/completions"
    embeddings_path: ClassVar[str] = "/v1/embeddings"
    health_path: ClassVar[str] = "/health"
    #: whether the engine family can serve vision-language models at all
    supports_images: ClassVar[bool] = True
    #: keys an engine of this kind accepts under ``options``
    options: ClassVar[tuple[EngineOption, ...]] = ()
    #: launched from a user-given ``launch.command`` instead of a command kiban knows
    takes_launch_command: ClassVar[bool] = False
    #: how the engine reports on each streamed event the tokens generated so far; None: it
    #: cannot, and a broken stream's tokens are counted as its content events
    token_count: ClassVar[TokenCount | None] = None

    def path_bytes(self, endpoint: str) -> bytes:
        """:meth:`path_for` as bytes, for the request line (cached)."""
        cache: dict[str, bytes] = self.__dict__.setdefault("_path_bytes", {})
        path = cache.get(endpoint)
        if path is None:
            path = cache[endpoint] = self.path_for(endpoint).encode()
        return path

    def path_for(self, endpoint: str) -> str:
        """Upstream path for one of ``chat``, ``completions``, ``embeddings``."""
        return {
            "chat": self.chat_path,
            "completions": self.completions_path,
            "embeddings": self.embeddings_path,
        }[endpoint]

    def error_to_openai(self, status: int, body: bytes) -> bytes:
        """Turn an upstream error body into the OpenAI error shape, keeping its message."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            text = body.decode("utf-8", "replace").strip()[:2000] or f"HTTP {status}"
            return error_body(text, _type_for(status), code=status)
        if isinstance(data, dict):
            err = data.get("error")
            if isinstance(err, dict) and "message" in err:
                return body
            message = self._message_of(data, err)
            if message:
                return error_body(message, _type_for(status), code=data.get("code", status))
        return error_body(body.decode("utf-8", "replace")[:2000], _type_for(status), code=status)

    def refuses_context_length(self, status: int, error: dict[str, Any]) -> bool:
        """The engine refused the request as too long for its context (*error*: the
        OpenAI-shaped error object): another engine, with a larger context, may answer.

        The default knows OpenAI's own code for it.
        """
        return status == 400 and error.get("code") == "context_length_exceeded"

    def option(self, config: EngineConfig, name: str) -> str:
        """The configured value of option *name*, or its default."""
        spec = next(o for o in self.options if o.name == name)
        value = config.options.get(name)
        return spec.default if value is None else str(value)

    def option_problems(self, config: EngineConfig) -> list[tuple[str, str]]:
        """``(key, problem)`` for each bad entry of ``options`` (key relative to the engine)."""
        known = {o.name: o for o in self.options}
        problems = []
        for name, value in config.options.items():
            spec = known.get(name)
            if spec is None:
                accepted = ", ".join(known) or "none"
                problems.append(
                    (f"options.{name}", f"unknown option for {self.name}; accepted: {accepted}")
                )
            elif value not in spec.choices:
                problems.append(
                    (
                        f"options.{name}",
                        f"expected one of {', '.join(spec.choices)} (got {value!r})",
                    )
                )
        return problems

    # -- structured output --

    def structured_capability(self, config: EngineConfig) -> StructuredCapability:
        """What this engine, at its configured version and backend, can enforce.

        The default assumes nothing: a server kiban knows nothing about may
        accept ``response_format`` and ignore it.
        """
        return StructuredCapability(describes=f"{self.name} (no guided decoding assumed)")

    def structured_fields(self, constraint: Constraint, config: EngineConfig) -> dict[str, Any]:
        """The request fields that carry *constraint* in this engine's dialect.

        Only called for kinds in ``structured_capability(config).expressible``.
        The default is OpenAI's ``response_format``.
        """
        return openai_response_format(constraint)

    def structured_output_error(self, status: int, message: str) -> OutputFailure | None:
        """An engine error that reports a bad *output* (not a bad request or a broken engine).

        Such an answer is a verification failure: retried as the route says, and
        no mark against the engine's health.
        """
        return None

    def refuses_constraint(self, status: int, message: str) -> bool:
        """An engine error that means this constraint failed (to compile, to run), not the
        engine: kiban asks again with less of it, and no mark against the engine's health."""
        return status in (400, 422)

    def structured_launch_args(self, config: EngineConfig) -> list[str]:
        """Server flags that make structured output safe (backend, whitespace limit)."""
        return []

    # -- continuation of a broken stream --

    def continuation_fields(self, config: EngineConfig) -> dict[str, Any] | None:
        """Request fields that make this engine continue a final assistant message.

        The gateway sends the conversation with the text a broken stream already
        gave the client as the last (assistant) message, plus these fields; the
        engine must then generate what follows that text, without repeating it.
        None: this engine cannot continue a prefix (kiban does not know that it can).
        """
        return None

    # -- launch --

    def environment(self, device: str) -> str | None:
        """The engine environment (kiban.deploy.envs) this kind runs from on *device*.

        None: the command runs as given, from the system (no environment to build).
        """
        raise LaunchUnsupported(
            f"kiban cannot launch {self.name!r} engines; start the server yourself and give "
            "its url (remove the launch section)"
        )

    def launch_argv(self, engine: EngineConfig, target: LaunchTarget) -> list[str]:
        """The engine's own server command: model, served names, address (no tuning flags).

        The supervisor appends the planner's flags and then ``launch.args``.
        """
        raise LaunchUnsupported(f"kiban cannot launch {self.name!r} engines")

    def launch_env(self, engine: EngineConfig) -> dict[str, str]:
        """Environment variables the engine needs besides the device selection."""
        return {}

    # -- containers --

    def container_image(self, device: str) -> ContainerImage:
        """The engine's official image for *device* (``gpu`` or ``cpu``), pinned.

        Raises :class:`LaunchUnsupported` naming what to do when there is none.
        """
        raise LaunchUnsupported(
            f"kiban knows no official container image for {self.name!r} engines; give one "
            "with launch.image (an image whose command line is launch.command)"
        )

    # -- metrics --

    #: path of the engine's Prometheus endpoint on its API port; None: it has none
    metrics_path: ClassVar[str | None] = "/metrics"
    #: launch flags that turn the metrics endpoint on (added to every managed launch)
    metrics_launch_args: ClassVar[tuple[str, ...]] = ()
    #: the engine's series for kiban's common signals
    metric_names: ClassVar[EngineMetricNames] = EngineMetricNames()

    # -- start-up report --

    #: extra command-line arguments that make the engine log what `startup_report` reads
    startup_log_args: ClassVar[tuple[str, ...]] = ()

    def startup_report(self, log_text: str) -> StartupReport:
        """Parse the engine's start-up log; engines that report nothing useful keep this."""
        return StartupReport()

    # -- planning --
    # Defaults describe an engine kiban does not launch; engines it launches
    # override them with their own facts (each citing the engine's code).

    #: whether kiban can plan (and so launch) this kind
    plannable: ClassVar[bool] = False
    #: KV dtype names the engine's flag takes, as shown in refusals and `kiban plan model`
    kv_dtypes: ClassVar[tuple[str, ...]] = ()
    #: True when the engine allocates its cache from a token count (llama.cpp -c), not a
    #: byte budget: the plan then records exactly what that count takes
    kv_sized_by_tokens: ClassVar[bool] = False
    #: True when the engine, on the CPU, binds its compute threads to fixed cores by itself
    #: (the same cores for every server): kiban then gives each such engine cores of its own
    pins_cpu_threads: ClassVar[bool] = False

    def kv_formats(
        self, kv_dtype: str, spec: ModelSpec, target: PlanTarget
    ) -> tuple[KvFormat, KvFormat]:
        """(K, V) storage for *kv_dtype* (kiban's generic name or the engine's own).

        Raises :class:`PlanRefusal` naming the reason when the engine cannot
        use that dtype for this model or device.
        """
        raise PlanRefusal(f"kiban does not launch {self.name} engines, so it cannot plan one")

    def kv_need(self, spec: ModelSpec, k: KvFormat, v: KvFormat, target: PlanTarget) -> KvNeed:
        """KV bytes per token on one GPU as this engine lays the cache out."""
        return kv_need(spec, k, v, target.tp)

    def weights_on_device(self, spec: ModelSpec, target: PlanTarget) -> int:
        """Weight bytes on each of the engine's GPUs (all of them in host memory on CPU)."""
        return -(-spec.weights_bytes // target.tp)

    def kv_allocation_unit(self, target: PlanTarget) -> int:
        """Granularity in bytes of the KV size the engine can be told (1: any byte count)."""
        return 1

    def kv_block_tokens(self, target: PlanTarget) -> int:
        """Tokens per cache block (the unit the engine allocates sequences in)."""
        return 1

    def kv_cache_bytes(
        self, need: KvNeed, context: int, concurrency: int, target: PlanTarget
    ) -> int:
        """Cache bytes (one GPU) the engine needs to hold *concurrency* sequences of *context*."""
        block = self.kv_block_tokens(target)
        per_sequence = blocks(context, block) * block * need.bytes_per_token
        sliding = blocks(min(context, need.window), block) * block * need.sliding_bytes_per_token
        return concurrency * (per_sequence + sliding)

    def kv_capacity_tokens(
        self, need: KvNeed, kv_bytes: int, context: int, target: PlanTarget
    ) -> int:
        """Tokens a cache of *kv_bytes* holds, counted the way the engine reports it."""
        block = self.kv_block_tokens(target)
        return kv_bytes // (block * need.bytes_per_token) * block

    def overhead_bytes(
        self, spec: ModelSpec, target: PlanTarget, context: int, concurrency: int
    ) -> int:
        """Memory (one GPU) beyond weights and KV cache: CUDA context, activations, graphs."""
        return 0

    def planning_warnings(
        self, spec: ModelSpec, k: KvFormat, v: KvFormat, target: PlanTarget
    ) -> list[str]:
        """Known traps of this engine with this model, KV dtype and device."""
        return []

    def plan_flags(self, plan: EnginePlan) -> list[str]:
        """Command-line flags that make the engine allocate what *plan* says."""
        return []

    def plan_env(self, plan: EnginePlan) -> dict[str, str]:
        """Environment variables the plan needs (e.g. vLLM CPU's KV cache size)."""
        return {}

    @staticmethod
    def _message_of(data: dict[str, Any], err: object) -> str | None:
        for candidate in (err, data.get("message"), data.get("detail")):
            if isinstance(candidate, str) and candidate:
                return candidate
        return None


def openai_response_format(constraint: Constraint) -> dict[str, Any]:
    """OpenAI's ``response_format`` for a json_schema or json_object constraint."""
    if constraint.kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    return {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": constraint.name, "schema": constraint.schema, "strict": True},
        }
    }


def choice_regex(choices: tuple[str, ...]) -> str:
    """A regular expression matching exactly one of *choices*."""
    return "(" + "|".join(_escape_regex(c) for c in choices) + ")"


def choice_gbnf(choices: tuple[str, ...]) -> str:
    """A GBNF grammar (llama.cpp, xgrammar EBNF) matching exactly one of *choices*."""
    return "root ::= " + " | ".join(_gbnf_literal(c) for c in choices)


def _escape_regex(text: str) -> str:
    return "".join("\\" + ch if ch in _REGEX_SPECIAL else ch for ch in text)


_REGEX_SPECIAL = frozenset("\\.^$|?*+()[]{}")


def _gbnf_literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped.replace("\r", "\\r").replace("\t", "\\t") + '"'


def _type_for(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "upstream_error"
