"""The small interface every engine kind implements.

Everything that differs between engines lives in one module per kind; the
gateway only talks to :class:`EngineKind`. Later capabilities (structured
output dialect, launch command, KV-cache planning, metrics names) are added
here as methods with a default, and overridden where an engine differs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from kiban.gateway.errors import error_body
from kiban.structured.capability import StructuredCapability
from kiban.structured.constraint import Constraint
from kiban.structured.verify import OutputFailure

if TYPE_CHECKING:
    from kiban.config import EngineConfig

_VERSION = re.compile(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``"0.11.2"`` -> ``(0, 11, 2)``; ``"v0.10.2rc1"`` -> ``(0, 10, 2)``; None if not a version."""
    match = _VERSION.match(text.strip())
    if match is None:
        return None
    return tuple(int(g or 0) for g in match.groups())  # type: ignore[return-value]


@dataclass(frozen=True)
class EngineOption:
    """An engine-specific key of ``engines[].options``: its accepted values and default."""

    name: str
    choices: tuple[str, ...]
    default: str
    help: str = ""


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

    def structured_launch_args(self, config: EngineConfig) -> list[str]:
        """Server flags that make structured output safe (backend, whitespace limit)."""
        return []

    # -- start-up report --

    #: extra command-line arguments that make the engine log what `startup_report` reads
    startup_log_args: ClassVar[tuple[str, ...]] = ()

    def startup_report(self, log_text: str) -> StartupReport:
        """Parse the engine's start-up log; engines that report nothing useful keep this."""
        return StartupReport()

    @staticmethod
    def _message_of(data: dict, err: object) -> str | None:
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
