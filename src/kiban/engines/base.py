"""The small interface every engine kind implements.

Everything that differs between engines lives in one module per kind; the
gateway only talks to :class:`EngineKind`. Later capabilities (structured
output dialect, launch command, KV-cache planning, metrics names) are added
here as methods with a default, and overridden where an engine differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import orjson

from kiban.gateway.errors import error_body


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


def _type_for(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "upstream_error"
