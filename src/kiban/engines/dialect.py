"""An engine's HTTP dialect: the one part of an engine kind the gateway talks to.

Paths (the API routes and the health check), how its errors map onto OpenAI's
shape and what they mean (context too long, constraint refused, bad output),
how it takes a structured-output constraint, and how it continues a final
assistant message. The defaults follow the OpenAI-compatible servers most
engines ship; an engine module subclasses :class:`Dialect` where it differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from kiban.api_errors import error_body
from kiban.structured.capability import StructuredCapability
from kiban.structured.constraint import Constraint
from kiban.structured.verify import OutputFailure

if TYPE_CHECKING:
    from kiban.config import EngineConfig


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


class Dialect:
    """The OpenAI-compatible dialect; subclasses override what their engine does differently."""

    chat_path: ClassVar[str] = "/v1/chat/completions"
    completions_path: ClassVar[str] = "/v1/completions"
    embeddings_path: ClassVar[str] = "/v1/embeddings"
    health_path: ClassVar[str] = "/health"
    #: whether the engine family can serve vision-language models at all
    supports_images: ClassVar[bool] = True
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
        """Engine path for one of ``chat``, ``completions``, ``embeddings``."""
        return {
            "chat": self.chat_path,
            "completions": self.completions_path,
            "embeddings": self.embeddings_path,
        }[endpoint]

    # -- errors --

    def error_to_openai(self, status: int, body: bytes) -> bytes:
        """Turn an engine's error body into the OpenAI error shape, keeping its message."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            text = body.decode("utf-8", "replace").strip()[:2000] or f"HTTP {status}"
            return error_body(text, _type_for(status), code=status)
        if isinstance(data, dict):
            err = data.get("error")
            if isinstance(err, dict) and "message" in err:
                return body
            message = _message_of(data, err)
            if message:
                return error_body(message, _type_for(status), code=data.get("code", status))
        return error_body(body.decode("utf-8", "replace")[:2000], _type_for(status), code=status)

    def refuses_context_length(self, status: int, error: dict[str, Any]) -> bool:
        """The engine refused the request as too long for its context (*error*: the
        OpenAI-shaped error object): another engine, with a larger context, may answer.

        The default knows OpenAI's own code for it.
        """
        return status == 400 and error.get("code") == "context_length_exceeded"

    # -- structured output --

    def structured_capability(self, config: EngineConfig) -> StructuredCapability:
        """What this engine, at its configured version and backend, can enforce.

        The default assumes nothing: a server kiban knows nothing about may
        accept ``response_format`` and ignore it.
        """
        return StructuredCapability(describes=f"{config.kind} (no guided decoding assumed)")

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

    # -- continuation of a broken stream --

    def continuation_fields(self, config: EngineConfig) -> dict[str, Any] | None:
        """Request fields that make this engine continue a final assistant message.

        The gateway sends the conversation with the text a broken stream already
        gave the client as the last (assistant) message, plus these fields; the
        engine must then generate what follows that text, without repeating it.
        None: this engine cannot continue a prefix (kiban does not know that it can).
        """
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


def _message_of(data: dict[str, Any], err: object) -> str | None:
    for candidate in (err, data.get("message"), data.get("detail")):
        if isinstance(candidate, str) and candidate:
            return candidate
    return None


def _type_for(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "upstream_error"
