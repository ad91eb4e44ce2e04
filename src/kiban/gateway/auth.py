"""Client API keys: where they come from, and who a request's key is.

Keys come from environment variables and from a keys file. The file is the
YAML that ``kiban keys`` writes (only SHA-256 digests, with a name, an
optional model allow-list and optional limits per key), or, the older form,
one ``sha256:<hex>`` (or a plain key) per line. A request's key is looked up
by its SHA-256 digest in a dict: O(1) whatever the number of keys, and the
timing of that lookup says nothing about the key (only about its digest).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiban.config import ApiKeys, ConfigError, RateLimits, _describe_validation

SHA256_PREFIX = "sha256:"
_HEX64 = r"^[0-9a-f]{64}$"


class KeyEntry(BaseModel):
    """One key of a keys file, as ``kiban keys`` writes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][\w.@-]*$")]
    sha256: Annotated[str, Field(pattern=_HEX64, description="hex SHA-256 of the key")]
    models: list[Annotated[str, Field(min_length=1)]] | None = None
    requests_per_minute: Annotated[int, Field(ge=1)] | None = None
    tokens_per_minute: Annotated[int, Field(ge=1)] | None = None
    admin: bool | None = None  # may open the console and read per-key usage
    created: str | None = None

    @property
    def limits(self) -> RateLimits:
        return RateLimits(
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
        )


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A configured key, known by its digest only."""

    name: str
    digest: bytes
    models: tuple[str, ...] | None = None
    limits: RateLimits | None = None  # None: the gateway's default limits
    source: str = ""  # the configuration key that defines it, for error messages
    admin: bool = False


def digest_of(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode("utf-8") if isinstance(key, str) else key).digest()


def read_keys_file(path: Path) -> tuple[list[ApiKey], list[str]]:
    """The keys of *path* in either form, and the problems found (naming line or entry)."""
    where = "gateway.api_keys.file"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        return [], [f"{where}: cannot read {str(path)!r}: {err.strerror}"]
    except UnicodeDecodeError:
        return [], [f"{where}: {str(path)!r} is not UTF-8 text"]
    tree = keys_yaml(text)
    if tree is None:
        return _read_lines(text)
    try:
        parsed = KeysFile.model_validate(tree)
    except ValidationError as err:
        return [], [f"{where} ({path.name}): {p}" for p in _describe_validation(err, tree)]
    keys, problems, names = [], [], set()
    for i, entry in enumerate(parsed.keys):
        if entry.name in names:
            problems.append(f"{where}: keys[{i}].name: duplicate key name {entry.name!r}")
        names.add(entry.name)
        keys.append(
            ApiKey(
                name=entry.name,
                digest=bytes.fromhex(entry.sha256),
                models=tuple(entry.models) if entry.models is not None else None,
                limits=entry.limits if entry.limits.enabled else None,
                source=f"{where}: keys[{i}]",
                admin=bool(entry.admin),
            )
        )
    return keys, problems


def keys_yaml(text: str) -> dict[str, Any] | None:
    """A keys file as a YAML mapping, or None when it is the one-key-per-line form."""
    stripped = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not stripped or not stripped[0].startswith("keys:"):
        return None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return tree if isinstance(tree, dict) else None


def _read_lines(text: str) -> tuple[list[ApiKey], list[str]]:
    keys, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(SHA256_PREFIX):
            try:
                digest = bytes.fromhex(line.removeprefix(SHA256_PREFIX))
            except ValueError:
                digest = b""
            if len(digest) != 32:
                problems.append(f"gateway.api_keys.file: line {n} is not a valid sha256 digest")
                continue
        else:
            digest = digest_of(line)
        keys.append(ApiKey(f"line-{n}", digest, source=f"gateway.api_keys.file: line {n}"))
    return keys, problems


def load_keys(spec: ApiKeys, env: Mapping[str, str] | None = None) -> list[ApiKey]:
    """Every configured key; a ConfigError lists every problem."""
    env = os.environ if env is None else env
    keys: list[ApiKey] = []
    problems: list[str] = []
    for i, name in enumerate(spec.env):
        value = env.get(name, "").strip()
        if not value:
            problems.append(f"gateway.api_keys.env[{i}]: environment variable {name} is not set")
            continue
        keys.append(ApiKey(f"env:{name}", digest_of(value), source=f"gateway.api_keys.env[{i}]"))
    if spec.file is not None:
        filed, file_problems = read_keys_file(spec.file)
        keys += filed
        problems += file_problems
    if problems:
        raise ConfigError(problems, "API keys")
    return keys


@dataclass(frozen=True, slots=True)
class Grant:
    """What one key may do: the routes it may use (None: all) and its limits."""

    bucket: str  # the limiter's name for this key: a digest prefix, never the key
    routes: frozenset[str] | None
    limits: RateLimits
    limited: bool
    name: str = "anonymous"  # the key's name, for usage per key
    admin: bool = False  # may open the console and read per-key usage


class KeyChecker:
    """Accepts ``Authorization: Bearer <key>`` when the key's digest is configured.

    With no keys configured every request gets the anonymous grant (the
    default limits, shared by all clients).
    """

    def __init__(
        self,
        keys: list[ApiKey],
        default_limits: RateLimits | None = None,
        route_of: Callable[[str], str | None] | None = None,
    ) -> None:
        defaults = default_limits or RateLimits()
        self.enabled = bool(keys)
        self.anonymous = Grant("anonymous", None, defaults, defaults.enabled)
        self._grants: dict[bytes, Grant] = {}
        problems = []
        for key in keys:
            routes = None
            if key.models is not None:
                resolved = set()
                for j, model in enumerate(key.models):
                    route = route_of(model) if route_of is not None else model
                    if route is None:
                        problems.append(
                            f"{key.source}.models[{j}]: no route serves model {model!r}"
                        )
                    else:
                        resolved.add(route)
                routes = frozenset(resolved)
            limits = key.limits or defaults
            self._grants[key.digest] = Grant(
                key.digest.hex()[:16], routes, limits, limits.enabled, key.name, key.admin
            )
        self.keys = list(keys)
        if problems:
            raise ConfigError(problems, "API keys")

    def grant_for(self, authorization: bytes | None) -> Grant | None:
        """The grant of the presented key; None when it is missing or unknown."""
        if not self.enabled:
            return self.anonymous
        if not authorization or authorization[:7].lower() != b"bearer ":
            return None
        return self._grants.get(hashlib.sha256(authorization[7:].strip()).digest())
