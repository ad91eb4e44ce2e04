"""A compiled JSON Schema validator per schema, cached (jsonschema-rs).

jsonschema-rs compiles a schema once into a Rust validator; checking a
typical response then costs well under a microsecond (see
bench/structured_validation.py). Formats are asserted (``validate_formats``):
an application that asked for ``"format": "email"`` gets an e-mail address.
References are resolved offline: a schema must carry its own definitions.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jsonschema_rs

from kiban.errors import KibanError

_CACHE_SIZE = 1024


class SchemaError(KibanError, ValueError):
    """The schema itself is not a valid JSON Schema (or references something unreachable)."""


@dataclass(frozen=True, slots=True)
class Violation:
    """Where an instance fails its schema: a JSON pointer and the validator's message."""

    pointer: str  # RFC 6901, "" for the whole document
    message: str
    keyword: str | None = None


class CompiledSchema:
    """One schema compiled for validation."""

    __slots__ = ("_validator",)

    def __init__(self, schema: Any) -> None:
        try:
            self._validator = jsonschema_rs.validator_for(
                schema, validate_formats=True, offline=True
            )
        except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as err:
            raise SchemaError(_first_line(str(err))) from None

    def is_valid(self, instance: Any) -> bool:
        return self._validator.is_valid(instance)

    def first_violation(self, instance: Any) -> Violation | None:
        """The first error (None when *instance* is valid)."""
        for err in self._validator.iter_errors(instance):
            path = list(err.schema_path)
            return Violation(
                json_pointer(err.instance_path),
                err.message,
                str(path[-1]) if path else None,
            )
        return None


class ValidatorCache:
    """Compiled schemas by their canonical bytes, least recently used evicted."""

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[bytes, CompiledSchema] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes, schema: Any) -> CompiledSchema:
        compiled = self._items.get(key)
        if compiled is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return compiled
        self.misses += 1
        compiled = CompiledSchema(schema)
        self._items[key] = compiled
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return compiled


def json_pointer(path: Any) -> str:
    """An RFC 6901 pointer from a sequence of keys and indexes."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "invalid schema"
