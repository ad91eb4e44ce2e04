"""The errors kiban answers itself: one catalogue of codes, and a named constructor for each.

Every :class:`ErrorCode` knows its HTTP status, its OpenAI error ``type``, and
the label it gives the metrics and the request log; a request handler raises
``errors.model_not_found(model, available)`` and never spells a status, a type
or a code. The JSON a client gets is ``{"error": {"message", "type", "param",
"code", ...extra}}``; a few errors carry ``"code": null`` (their code is
kiban's own, see ``on_wire``), as they always have.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import orjson

from kiban.errors import KibanError

_INVALID = "invalid_request_error"
_RATE = "rate_limit_error"
_OUTPUT = "invalid_response_error"


class ErrorCode(StrEnum):
    """An error kiban answers: its code, HTTP status, OpenAI type and metric labels.

    ``on_wire`` False: the client sees ``"code": null`` and the metric label is
    the type (these errors predate the catalogue; their JSON stays as it was).
    ``rate_limit``: the ``limit`` label of ``kiban_rate_limit_rejections_total``
    when the gateway counts this error as a 429 of its own.
    """

    status: int
    type: str
    on_wire: bool
    rate_limit: str | None

    def __new__(
        cls,
        code: str,
        status: int,
        type_: str = _INVALID,
        on_wire: bool = True,
        rate_limit: str | None = None,
    ) -> ErrorCode:
        member = str.__new__(cls, code)
        member._value_ = code
        member.status = status
        member.type = type_
        member.on_wire = on_wire
        member.rate_limit = rate_limit
        return member

    @property
    def label(self) -> str:
        """The ``error`` of the request log and the metrics: the code, or the type off the wire."""
        return self.value if self.on_wire else self.type

    # the request itself
    UNKNOWN_PATH = ("unknown_path", 404)
    METHOD_NOT_ALLOWED = ("method_not_allowed", 405)
    INVALID_CONTENT_LENGTH = ("invalid_content_length", 400, _INVALID, False)
    BODY_TOO_LARGE = ("body_too_large", 413)
    UNSUPPORTED_MEDIA_TYPE = ("unsupported_media_type", 415)
    INVALID_JSON = ("invalid_json", 400)
    MISSING_MODEL = ("missing_model", 400)
    INVALID_STREAM = ("invalid_stream", 400, _INVALID, False)
    MODEL_NOT_FOUND = ("model_not_found", 404)
    IMAGES_NOT_SUPPORTED = ("images_not_supported", 400)
    # keys and limits
    INVALID_API_KEY = ("invalid_api_key", 401, "authentication_error")
    ADMIN_KEY_REQUIRED = ("admin_key_required", 403, "permission_error")
    MODEL_NOT_ALLOWED = ("model_not_allowed", 403, "permission_error")
    RATE_LIMIT_EXCEEDED = ("rate_limit_exceeded", 429, _RATE)
    # engines
    ENGINES_SATURATED = ("engines_saturated", 429, _RATE, True, "engine_concurrency")
    QUEUE_TIMEOUT = ("queue_timeout", 429, _RATE, True, "engine_queue_timeout")
    NO_HEALTHY_ENGINE = ("no_healthy_engine", 503, "service_unavailable")
    UPSTREAM_TIMEOUT = ("upstream_timeout", 504, "timeout")
    #: an engine's own error relayed as it sent it (status and body are the engine's)
    ENGINE_ERROR = ("engine_error", 502, _INVALID, False)
    INTERNAL_ERROR = ("internal_error", 500, "server_error")
    # structured output: the request's constraint
    MULTIPLE_CONSTRAINTS = ("multiple_constraints", 400)
    UNSUPPORTED_CONSTRAINT = ("unsupported_constraint", 400)
    INVALID_RESPONSE_FORMAT = ("invalid_response_format", 400)
    INVALID_JSON_SCHEMA = ("invalid_json_schema", 400)
    TOO_DEEP = ("too_deep", 400)
    FIXED_SCHEMA_ROUTE = ("fixed_schema_route", 400)
    STRUCTURED_OUTPUT_UNSUPPORTED = ("structured_output_unsupported", 400)
    STRUCTURED_OUTPUT_REJECTED = ("structured_output_rejected", 400)
    # structured output: the engine's answer failed verification (kiban.structured.verify)
    STRUCTURED_OUTPUT_NO_CONTENT = ("structured_output_no_content", 422, _OUTPUT)
    STRUCTURED_OUTPUT_INVALID_JSON = ("structured_output_invalid_json", 422, _OUTPUT)
    STRUCTURED_OUTPUT_TRUNCATED = ("structured_output_truncated", 422, _OUTPUT)
    STRUCTURED_OUTPUT_WHITESPACE_RUNAWAY = ("structured_output_whitespace_runaway", 422, _OUTPUT)
    STRUCTURED_OUTPUT_NOT_AN_OBJECT = ("structured_output_not_an_object", 422, _OUTPUT)
    STRUCTURED_OUTPUT_SCHEMA_VIOLATION = ("structured_output_schema_violation", 422, _OUTPUT)
    STRUCTURED_OUTPUT_REGEX_MISMATCH = ("structured_output_regex_mismatch", 422, _OUTPUT)
    STRUCTURED_OUTPUT_NOT_A_CHOICE = ("structured_output_not_a_choice", 422, _OUTPUT)


_BY_CODE: dict[str, ErrorCode] = {code.value: code for code in ErrorCode}


def error_body(
    message: str,
    type_: str,
    param: str | None = None,
    code: str | int | None = None,
    extra: dict[str, object] | None = None,
) -> bytes:
    """``{"error": {"message", "type", "param", "code", ...extra}}`` as JSON bytes."""
    error: dict[str, object] = {"message": message, "type": type_, "param": param, "code": code}
    if extra:
        error.update(extra)
    return orjson.dumps({"error": error})


def error_event(
    message: str, type_: str, code: str, extra: dict[str, object] | None = None
) -> bytes:
    """An SSE event carrying an OpenAI error, for failures after streaming began."""
    return b"data: " + error_body(message, type_, code=code, extra=extra) + b"\n\n"


class APIError(KibanError):
    """An error kiban answers itself; build one with the constructors below."""

    def __init__(
        self,
        error: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        status: int | None = None,
        raw_body: bytes | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.error = error
        self.status = status or error.status
        self.message = message
        self.type = error.type
        self.param = param
        self.code: ErrorCode | None = error if error.on_wire else None
        self.headers = headers or []
        self.raw_body = raw_body
        self.extra = extra

    def body(self) -> bytes:
        """The error as JSON; an engine's own (already OpenAI-shaped) error when relayed."""
        if self.raw_body is not None:
            return self.raw_body
        return error_body(self.message, self.type, self.param, self.code, self.extra)


# -- the request itself ----------------------------------------------------------------------


def unknown_path(path: str) -> APIError:
    return APIError(ErrorCode.UNKNOWN_PATH, f"unknown path {path!r}")


def method_not_allowed(method: str, path: str, allowed: str) -> APIError:
    return APIError(
        ErrorCode.METHOD_NOT_ALLOWED,
        f"method {method} is not allowed on {path}; use {allowed}",
        headers=[(b"allow", allowed.encode())],
    )


def invalid_content_length() -> APIError:
    return APIError(ErrorCode.INVALID_CONTENT_LENGTH, "invalid Content-Length header")


def body_too_large(limit: int) -> APIError:
    return APIError(
        ErrorCode.BODY_TOO_LARGE,
        f"request body is larger than the limit of {limit} bytes (gateway.max_body_bytes)",
    )


def unsupported_media_type(content_type: bytes) -> APIError:
    return APIError(
        ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        f"Content-Type {content_type.decode('latin-1')[:100]!r} is not accepted; "
        "send the body as JSON with 'Content-Type: application/json'",
    )


def invalid_json(problem: Any = None) -> APIError:
    """*problem*: the parser's complaint; None when the body is JSON but not an object."""
    if problem is None:
        return APIError(ErrorCode.INVALID_JSON, "request body must be a JSON object")
    return APIError(ErrorCode.INVALID_JSON, f"request body is not valid JSON: {problem}")


def missing_model() -> APIError:
    return APIError(
        ErrorCode.MISSING_MODEL, "'model' is required and must be a string", param="model"
    )


def invalid_stream() -> APIError:
    return APIError(ErrorCode.INVALID_STREAM, "'stream' must be a boolean", param="stream")


def model_not_found(model: str, available: list[str]) -> APIError:
    return APIError(
        ErrorCode.MODEL_NOT_FOUND,
        f"model {model!r} does not exist; available models: {', '.join(available)}",
        param="model",
    )


def images_not_supported(route: str) -> APIError:
    return APIError(
        ErrorCode.IMAGES_NOT_SUPPORTED,
        f"model {route!r} has no engine that accepts image inputs; "
        "send text only or use a vision-language route",
        param="messages",
    )


# -- keys and limits -------------------------------------------------------------------------


def invalid_api_key() -> APIError:
    return APIError(
        ErrorCode.INVALID_API_KEY, "missing or invalid API key; send 'Authorization: Bearer <key>'"
    )


def admin_key_missing() -> APIError:
    return APIError(
        ErrorCode.INVALID_API_KEY,
        "the console needs an admin API key; send 'Authorization: Bearer <key>' "
        "(create one with `kiban keys add NAME --admin`)",
    )


def admin_key_required(key: str) -> APIError:
    return APIError(
        ErrorCode.ADMIN_KEY_REQUIRED,
        f"API key {key!r} is a client key; the console needs an admin key",
    )


def model_not_allowed(model: str, allowed: list[str]) -> APIError:
    return APIError(
        ErrorCode.MODEL_NOT_ALLOWED,
        f"this API key may not use model {model!r}; it may use: {', '.join(allowed) or 'none'}",
        param="model",
    )


def rate_limit_exceeded(which: str, limit: Any, seconds: int) -> APIError:
    return APIError(
        ErrorCode.RATE_LIMIT_EXCEEDED,
        f"this API key is over its {which} limit ({limit}); retry in {seconds} s",
        headers=[(b"retry-after", str(seconds).encode())],
    )


# -- engines ---------------------------------------------------------------------------------


def engines_saturated(route: str, busy: list[str]) -> APIError:
    """*busy*: one line per engine, what it has in flight and waiting."""
    return APIError(
        ErrorCode.ENGINES_SATURATED,
        f"every engine of model {route!r} is at its concurrency limit: {'; '.join(busy)}",
        headers=[(b"retry-after", b"1")],
    )


def queue_timeout(route: str, engine: str, timeout_s: float, max_concurrency: int) -> APIError:
    return APIError(
        ErrorCode.QUEUE_TIMEOUT,
        f"no engine of model {route!r} had a free slot within the queue timeout: "
        f"waited {timeout_s:g} s for engine {engine!r} "
        f"(its queue_timeout_s; max_concurrency {max_concurrency})",
        headers=[(b"retry-after", b"1")],
    )


def no_healthy_engine(message: str) -> APIError:
    return APIError(ErrorCode.NO_HEALTHY_ENGINE, message, headers=[(b"retry-after", b"5")])


def upstream_timeout(message: str) -> APIError:
    return APIError(ErrorCode.UPSTREAM_TIMEOUT, message)


def engine_error(
    status: int, message: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> APIError:
    """The engine's own error, relayed with its status, headers and body."""
    return APIError(ErrorCode.ENGINE_ERROR, message, status=status, headers=headers, raw_body=body)


def internal_error(request_id: str) -> APIError:
    return APIError(
        ErrorCode.INTERNAL_ERROR,
        f"internal error in the gateway (request id {request_id}); see its log",
    )


# -- structured output -----------------------------------------------------------------------


def multiple_constraints(names: list[str], param: str) -> APIError:
    return APIError(
        ErrorCode.MULTIPLE_CONSTRAINTS,
        f"only one structured-output constraint may be given per request; got {', '.join(names)}",
        param=param,
    )


def unsupported_constraint(param: str) -> APIError:
    return APIError(
        ErrorCode.UNSUPPORTED_CONSTRAINT,
        f"{param} is not supported by kiban; use a JSON Schema, regex, choice or grammar",
        param=param,
    )


def invalid_response_format(param: str, problem: str) -> APIError:
    return APIError(ErrorCode.INVALID_RESPONSE_FORMAT, f"{param} {problem}", param=param)


def invalid_json_schema(param: str, problem: Any) -> APIError:
    return APIError(
        ErrorCode.INVALID_JSON_SCHEMA, f"{param} is not a valid JSON Schema: {problem}", param=param
    )


def too_deep() -> APIError:
    return APIError(ErrorCode.TOO_DEEP, "the structured-output constraint is nested too deeply")


def fixed_schema_route(route: str, param: str) -> APIError:
    return APIError(
        ErrorCode.FIXED_SCHEMA_ROUTE,
        f"model {route!r} is an extractor with a fixed schema; leave out "
        f"{param} or send the same schema",
        param=param,
    )


def structured_output_unsupported(message: str, param: str) -> APIError:
    return APIError(ErrorCode.STRUCTURED_OUTPUT_UNSUPPORTED, message, param=param)


def structured_output_rejected(message: str, param: str | None) -> APIError:
    return APIError(ErrorCode.STRUCTURED_OUTPUT_REJECTED, message, param=param)


def invalid_structured_output(
    code: str, message: str, param: str | None, extra: dict[str, object]
) -> APIError:
    """The engine's output failed verification; *code* is ``OutputFailure.code``."""
    return APIError(_BY_CODE[code], message, param=param, extra=extra)
