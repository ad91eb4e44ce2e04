"""Client API keys: loaded from environment variables or a file, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping

from kiban.config import ApiKeys, ConfigError

_SHA256_PREFIX = "sha256:"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def load_key_digests(spec: ApiKeys, env: Mapping[str, str] | None = None) -> list[bytes]:
    """SHA-256 digests of every configured key; a file line may hold ``sha256:<hex>``."""
    env = os.environ if env is None else env
    digests: list[bytes] = []
    problems: list[str] = []
    for i, name in enumerate(spec.env):
        value = env.get(name, "").strip()
        if not value:
            problems.append(f"gateway.api_keys.env[{i}]: environment variable {name} is not set")
            continue
        digests.append(_digest(value))
    if spec.file is not None:
        try:
            lines = spec.file.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            problems.append(
                f"gateway.api_keys.file: cannot read {str(spec.file)!r}: {err.strerror}"
            )
            lines = []
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(_SHA256_PREFIX):
                try:
                    digest = bytes.fromhex(line.removeprefix(_SHA256_PREFIX))
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    problems.append(f"gateway.api_keys.file: line {n} is not a valid sha256 digest")
                    continue
                digests.append(digest)
            else:
                digests.append(_digest(line))
    if problems:
        raise ConfigError(problems, "API keys")
    return digests


class KeyChecker:
    """Accepts ``Authorization: Bearer <key>`` when the key's digest is configured."""

    def __init__(self, digests: list[bytes]) -> None:
        self.digests = digests

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def check(self, authorization: bytes | None) -> bool:
        if not self.digests:
            return True
        if not authorization or authorization[:7].lower() != b"bearer ":
            return False
        presented = hashlib.sha256(authorization[7:].strip()).digest()
        matched = False
        for digest in self.digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched
