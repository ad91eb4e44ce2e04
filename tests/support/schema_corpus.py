"""Run the JSON Schema corpus (tests/data/schema_corpus.jsonl.gz) through a kiban gateway."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kiban.structured.validator import CompiledSchema

CORPUS = Path(__file__).resolve().parent.parent / "data" / "schema_corpus.jsonl.gz"
PROMPT = "Answer with one JSON document that follows the schema."


def load_corpus(path: Path = CORPUS) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@dataclass
class Outcome:
    """What kiban answered for one schema."""

    id: str
    status: int
    category: str  # "valid", "refused", "failed_verification", "returned_invalid", "other"
    code: str | None = None
    message: str = ""
    structured: str | None = None  # the x-kiban-structured header


@dataclass
class CorpusReport:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, category: str) -> int:
        return sum(1 for o in self.outcomes if o.category == category)

    def share(self, category: str) -> float:
        return self.count(category) / len(self.outcomes) if self.outcomes else 0.0

    def codes(self) -> Counter[str]:
        return Counter(o.code or o.category for o in self.outcomes if o.category != "valid")

    def how(self) -> Counter[str]:
        """Valid answers by the x-kiban-structured header (enforced, validated)."""
        return Counter(str(o.structured) for o in self.outcomes if o.category == "valid")

    def summary(self) -> str:
        lines = [f"{len(self.outcomes)} schemas"]
        for category in ("valid", "refused", "failed_verification", "returned_invalid", "other"):
            n = self.count(category)
            lines.append(f"  {category:20s} {n:4d}  {100 * self.share(category):5.1f}%")
        lines.append("  by code: " + ", ".join(f"{c}={n}" for c, n in self.codes().most_common()))
        lines.append("  valid: " + ", ".join(f"{h}={n}" for h, n in self.how().most_common()))
        return "\n".join(lines)


async def run_corpus(
    base_url: str,
    model: str,
    schemas: list[dict[str, Any]],
    *,
    concurrency: int = 4,
    max_tokens: int = 128,
    timeout_s: float = 120.0,
) -> CorpusReport:
    """Send one chat request per schema (response_format json_schema) and classify the answer.

    A 200 is checked again here, with jsonschema-rs, independently of the gateway.
    """
    report = CorpusReport()
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(row: dict[str, Any]) -> None:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": max_tokens,
                "temperature": 1.0,
                "seed": 7,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "corpus", "schema": row["schema"]},
                },
            }
            async with gate, session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
                data = await resp.json(content_type=None)
            outcome = classify(row, resp.status, data)
            outcome.structured = resp.headers.get("x-kiban-structured")
            report.outcomes.append(outcome)

        await asyncio.gather(*(one(row) for row in schemas))
    return report


def classify(row: dict[str, Any], status: int, data: Any) -> Outcome:
    if status == 200:
        content = data["choices"][0]["message"]["content"]
        try:
            instance = json.loads(content)
        except (TypeError, json.JSONDecodeError) as err:
            return Outcome(row["id"], status, "returned_invalid", "not_json", str(err))
        if CompiledSchema(row["schema"]).first_violation(instance) is not None:
            return Outcome(row["id"], status, "returned_invalid", "schema", content[:200])
        return Outcome(row["id"], status, "valid")
    error = data.get("error", {}) if isinstance(data, dict) else {}
    code, message = error.get("code"), error.get("message", "")
    if status == 400 and message:
        return Outcome(row["id"], status, "refused", str(code), message)
    if status == 422 and str(code).startswith("structured_output_"):
        return Outcome(row["id"], status, "failed_verification", str(code), message)
    return Outcome(row["id"], status, "other", str(code), message)


def assert_nothing_invalid_returned(report: CorpusReport) -> None:
    """No invalid output came back as a success; every answer says how it was obtained."""
    bad = [o for o in report.outcomes if o.category in ("returned_invalid", "other")]
    assert bad == [], bad
    for o in report.outcomes:
        if o.category == "valid":
            assert o.structured in ("enforced", "validated"), o
        else:
            assert o.code and o.message and o.structured == o.code, o
