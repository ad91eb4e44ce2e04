"""OpenAI-shaped error bodies and the errors kiban raises while handling a request."""

from __future__ import annotations

import orjson


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


class APIError(Exception):
    """An error kiban answers itself, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        raw_body: bytes | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or []
        self.raw_body = raw_body
        self.extra = extra

    def body(self) -> bytes:
        """The error as JSON; an engine's own (already OpenAI-shaped) error when relayed."""
        if self.raw_body is not None:
            return self.raw_body
        return error_body(self.message, self.type, self.param, self.code, self.extra)
