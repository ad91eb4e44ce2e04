"""What `kiban bench` sends: the target URL and the requests, built once as raw bytes."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson

from kiban.errors import KibanError

Endpoint = Literal["chat", "completions"]
ENDPOINT_PATHS: dict[Endpoint, str] = {"chat": "/chat/completions", "completions": "/completions"}
DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


class WorkloadError(KibanError, ValueError):
    """A target or a request that cannot be built; the message says what to give instead."""


@dataclass(frozen=True)
class Destination:
    """Where requests go: scheme, host, port and the endpoint's path."""

    scheme: str
    host: str
    port: int
    path: str
    endpoint: Endpoint

    @classmethod
    def from_url(cls, url: str, endpoint: Endpoint | None = None) -> Destination:
        """Accepts a server root (``http://h:8000``), an API base (``.../v1``) or a full
        endpoint URL (``.../v1/chat/completions``); *endpoint* picks chat or completions
        when the URL does not say."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WorkloadError(
                f"expected an http:// or https:// URL such as http://127.0.0.1:8000 (got {url!r})"
            )
        if parts.query or parts.fragment:
            raise WorkloadError(f"the URL must not have a query or fragment (got {url!r})")
        path = parts.path.rstrip("/")
        named = next((e for e, p in ENDPOINT_PATHS.items() if path.endswith(p)), None)
        if named is not None:
            if endpoint is not None and endpoint != named:
                raise WorkloadError(f"the URL {url!r} is a {named} endpoint, not {endpoint}")
            endpoint = named
        else:
            endpoint = endpoint or "chat"
            path = (path or "/v1") + ENDPOINT_PATHS[endpoint]
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise WorkloadError(f"invalid port in {url!r}") from None
        return cls(parts.scheme, parts.hostname, port, path, endpoint)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}{self.path}"

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def models_path(self) -> str:
        """GET path listing the server's models (``.../v1/models``)."""
        return self.path.removesuffix(ENDPOINT_PATHS[self.endpoint]) + "/models"

    def tls(self) -> ssl.SSLContext | None:
        return ssl.create_default_context() if self.scheme == "https" else None


@dataclass(frozen=True)
class Workload:
    """The requests of one run: the same shape, round-robin over the prompts."""

    target: Destination
    model: str
    stream: bool = False
    max_tokens: int | None = 128
    prompts: tuple[str, ...] = (DEFAULT_PROMPT,)
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()
    api_key: str | None = None
    include_usage: bool = True

    def body(self, prompt: str) -> dict[str, Any]:
        """The JSON body for one prompt."""
        body: dict[str, Any] = {"model": self.model}
        if self.target.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.stream:
            body["stream"] = True
            if self.include_usage:
                body["stream_options"] = {"include_usage": True}
        body.update(self.extra_body)
        return body

    def raw_requests(self) -> list[bytes]:
        """One complete HTTP/1.1 request per prompt."""
        return [
            self._raw("POST", self.target.path, orjson.dumps(self.body(p))) for p in self.prompts
        ]

    def models_request(self) -> bytes:
        return self._raw("GET", self.target.models_path, b"")

    def _raw(self, method: str, path: str, body: bytes) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.target.authority}"]
        if body:
            lines.append("Content-Type: application/json")
        lines.append(f"Accept: {'text/event-stream' if self.stream else 'application/json'}")
        if self.api_key:
            lines.append(f"Authorization: Bearer {self.api_key}")
        lines += [f"{name}: {value}" for name, value in self.headers]
        lines.append(f"Content-Length: {len(body)}")
        head = "\r\n".join(lines) + "\r\n\r\n"
        try:
            return head.encode("latin-1") + body
        except UnicodeEncodeError:
            raise WorkloadError("header names and values must be Latin-1 text") from None


def parse_header(text: str) -> tuple[str, str]:
    """``"Name: value"`` as a pair; refuses what would break the request."""
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not name or any(c in name for c in " \t\r\n") or any(c in value for c in "\r\n"):
        raise WorkloadError(f"expected a header as 'Name: value' (got {text!r})")
    return name, value
