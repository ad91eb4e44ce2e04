"""Checking one structured response: typed failures with what failed and where.

Never repairs: output cut off at ``max_tokens`` is a failure even when a
closing brace would make it parse (a repaired document is not what the
engine enforced).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

from kiban.structured.constraint import Constraint
from kiban.structured.validator import CompiledSchema

#: a whitespace run at least this long in a truncated output counts as runaway
WHITESPACE_RUN = 64
_WHITESPACE_TAIL = re.compile(r"\s+\Z")
_NUMBER_CHARS = frozenset("0123456789.eE+-")


@dataclass(frozen=True, slots=True)
class OutputFailure:
    """Why a response does not satisfy its constraint.

    ``kind`` is one of ``no_content``, ``invalid_json``, ``truncated``,
    ``whitespace_runaway``, ``not_an_object``, ``schema_violation``,
    ``regex_mismatch``, ``not_a_choice``. ``pointer`` is the RFC 6901 pointer
    of the failing instance location for schema violations.
    """

    kind: str
    message: str
    pointer: str | None = None
    #: for a truncated JSON output: where it ran away, "string", "number" or None
    runaway: str | None = None

    @property
    def code(self) -> str:
        return f"structured_output_{self.kind}"


def verify_content(
    constraint: Constraint,
    compiled: CompiledSchema | None,
    content: str | None,
    finish_reason: str | None,
    whitespace_run: int = WHITESPACE_RUN,
) -> OutputFailure | None:
    """None when *content* satisfies *constraint*, else the first failure found."""
    if not content:
        if finish_reason == "length":
            return OutputFailure("truncated", "the engine stopped at max_tokens before any content")
        return OutputFailure("no_content", "the response has no message content")
    if constraint.is_json:
        return _verify_json(constraint, compiled, content, finish_reason, whitespace_run)
    if constraint.kind == "choice":
        if content in constraint.choices:
            return None
        if finish_reason == "length":
            return _truncated(content, finish_reason, whitespace_run, "is not complete")
        return OutputFailure("not_a_choice", f"{_clip(content)!r} is not one of the choices")
    if constraint.kind == "regex":
        pattern = _regex(constraint.pattern or "")
        if pattern is None or pattern.fullmatch(content):
            return None  # a pattern Python cannot compile is left to the engine
        if finish_reason == "length":
            return _truncated(content, finish_reason, whitespace_run, "is not complete")
        return OutputFailure("regex_mismatch", f"{_clip(content)!r} does not match the pattern")
    if finish_reason == "length":  # a grammar kiban cannot check: it can still see truncation
        return _truncated(content, finish_reason, whitespace_run, "may not be complete")
    return None


def _verify_json(
    constraint: Constraint,
    compiled: CompiledSchema | None,
    content: str,
    finish_reason: str | None,
    whitespace_run: int,
) -> OutputFailure | None:
    try:
        instance = orjson.loads(content)
    except orjson.JSONDecodeError as err:
        if finish_reason == "length":
            return _truncated(content, finish_reason, whitespace_run, "is unfinished JSON")
        return OutputFailure("invalid_json", f"the response is not valid JSON: {err}")
    if constraint.kind == "json_object":
        if isinstance(instance, dict):
            return None
        return OutputFailure(
            "not_an_object", f"the response is JSON but not an object ({type(instance).__name__})"
        )
    if compiled is None or compiled.is_valid(instance):
        return None
    violation = compiled.first_violation(instance)
    if violation is None:  # is_valid and iter_errors disagree only on a validator bug
        return None
    where = violation.pointer or "(root)"
    return OutputFailure(
        "schema_violation",
        f"the response does not match the schema at {where}: {violation.message}",
        violation.pointer,
    )


def _truncated(
    content: str, finish_reason: str | None, whitespace_run: int, what: str
) -> OutputFailure:
    tail = _WHITESPACE_TAIL.search(content)
    run = len(tail.group()) if tail else _longest_whitespace_run(content)
    if run >= whitespace_run:
        return OutputFailure(
            "whitespace_runaway",
            f"the engine filled max_tokens with whitespace (a run of {run} whitespace "
            f"characters in {len(content)}); the output {what}",
        )
    runaway = open_value(content)
    inside = f", cut off inside a {runaway}" if runaway else ""
    return OutputFailure(
        "truncated",
        f"the engine stopped at max_tokens (finish_reason {finish_reason!r}) and the output "
        f"{what} ({len(content)} characters{inside}); raise max_tokens",
        runaway=runaway,
    )


def open_value(text: str) -> str | None:
    """``"string"`` or ``"number"`` when unfinished JSON *text* ends inside one, else None."""
    in_string = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = in_string
        elif ch == '"':
            in_string = not in_string
    if in_string:
        return "string"
    if text[-1:] in _NUMBER_CHARS:
        return "number"
    return None


def _longest_whitespace_run(text: str) -> int:
    longest = current = 0
    for ch in text:
        if ch.isspace():
            current += 1
            longest = max(longest, current)
        else:
            current = 0
    return longest


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def choices_of(body: dict[str, Any]) -> list[tuple[str | None, str | None]]:
    """``(content, finish_reason)`` of each choice of a chat or text completion."""
    out: list[tuple[str | None, str | None]] = []
    for choice in body.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else choice.get("text")
        out.append((content if isinstance(content, str) else None, choice.get("finish_reason")))
    return out
