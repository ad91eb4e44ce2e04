#!/usr/bin/env python3
"""What structured output costs in kiban: validation per response, and TTFT added by schemas.

    python bench/structured_validation.py                       # in-process figures
    python bench/structured_validation.py --engine-url URL      # + TTFT through kiban

1. Validation per response (µs): kiban's path (orjson parse + compiled jsonschema-rs
   validator, i.e. ``verify_content``) on a typical and a large schema, next to
   fastjsonschema and jsonschema (Python) on the same instances where installed
   (``pip install -e '.[bench]'``).
2. Schema handling per request in the gateway (µs): ``StructuredService.prepare`` for
   a schema never seen (cold: validator compile, feature analysis) and a cached one
   (warm), plus translating the body for an engine.
3. With ``--engine-url`` (a vLLM serving ``--model-name``): time to the first streamed
   content token through an in-process kiban gateway, without a schema, with a new
   schema each request (cold: kiban compiles a validator and the engine a grammar) and
   with the same schema again (warm: both cached).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kiban.config import parse_config  # noqa: E402
from kiban.gateway.routing import Router  # noqa: E402
from kiban.gateway.structured import StructuredService  # noqa: E402
from kiban.structured.constraint import constraint_from_request  # noqa: E402
from kiban.structured.validator import CompiledSchema  # noqa: E402
from kiban.structured.verify import verify_content  # noqa: E402

TYPICAL = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
TYPICAL_DOC = {
    "name": "Ann Example",
    "age": 41,
    "email": "ann@example.com",
    "tags": ["a", "b", "c"],
    "address": {"city": "Kyoto", "zip": "600-8216"},
}


def large_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """200 typed properties over 20 nested objects, and a 200-item array of records."""
    groups = {}
    doc: dict[str, Any] = {}
    for g in range(20):
        props = {}
        inner = {}
        for p in range(10):
            kind = ("string", "integer", "number", "boolean")[p % 4]
            props[f"f{p}"] = {"type": kind}
            inner[f"f{p}"] = {"string": "text", "integer": 7, "number": 1.5, "boolean": True}[kind]
        groups[f"g{g}"] = {
            "type": "object",
            "properties": props,
            "required": list(props),
            "additionalProperties": False,
        }
        doc[f"g{g}"] = inner
    record = {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "label": {"type": "string", "maxLength": 40}},
        "required": ["id", "label"],
    }
    schema = {
        "type": "object",
        "properties": {**groups, "records": {"type": "array", "items": record}},
        "required": [*groups, "records"],
    }
    doc["records"] = [{"id": i, "label": f"record {i}"} for i in range(200)]
    return schema, doc


def per_call_us(fn: Callable[[], object], min_seconds: float = 0.3) -> float:
    """Median of 5 runs of the mean cost of *fn* in µs."""
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - start > min_seconds / 5:
            break
        n *= 2
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(runs)


def validation_rows() -> list[tuple[str, str, float | None]]:
    rows: list[tuple[str, str, float | None]] = []
    big_schema, big_doc = large_schema()
    for label, schema, doc in (("typical", TYPICAL, TYPICAL_DOC), ("large", big_schema, big_doc)):
        text = orjson.dumps(doc).decode()
        constraint = constraint_from_request({"guided_json": schema})
        compiled = CompiledSchema(schema)
        assert verify_content(constraint, compiled, text, "stop") is None
        size = f"{label} ({len(text)} B)"
        kiban_verify = partial(verify_content, constraint, compiled, text, "stop")
        rows.append((size, "kiban verify (orjson + jsonschema-rs)", per_call_us(kiban_verify)))
        is_valid = partial(compiled.is_valid, orjson.loads(text))
        rows.append((size, "jsonschema-rs is_valid (parsed)", per_call_us(is_valid)))
        for name, build in (
            ("fastjsonschema", _fastjsonschema),
            ("jsonschema (Python)", _jsonschema),
        ):
            check = build(schema)
            cost = None if check is None else per_call_us(partial(_parse_then, check, text))
            rows.append((size, f"orjson + {name}", cost))
    return rows


def _parse_then(check: Callable[[Any], object], text: str) -> object:
    return check(orjson.loads(text))


def _fastjsonschema(schema: dict[str, Any]) -> Callable[[Any], object] | None:
    try:
        import fastjsonschema
    except ImportError:
        return None
    return fastjsonschema.compile(schema)


def _jsonschema(schema: dict[str, Any]) -> Callable[[Any], object] | None:
    try:
        import jsonschema
    except ImportError:
        return None
    return jsonschema.Draft202012Validator(schema).is_valid


def handling_rows() -> list[tuple[str, float]]:
    cfg = parse_config(
        {
            "engines": [
                {"name": "v", "kind": "vllm", "url": "http://127.0.0.1:9", "models": ["m"]}
            ],
            "routes": [{"model": "m", "engines": ["v"]}],
        }
    )
    route = Router(cfg).route_for("m")
    big_schema, _ = large_schema()
    rows = []
    for label, schema in (("typical", TYPICAL), ("large", big_schema)):
        cold = partial(_prepare_cold, cfg, route, schema, iter(range(10**9)))
        rows.append((f"{label}: prepare, cold schema", per_call_us(cold, 0.5)))
        service = StructuredService(cfg.routes)
        payload = {"model": "m", "messages": [], "response_format": _rf(schema)}
        rows.append(
            (
                f"{label}: prepare, warm schema",
                per_call_us(partial(service.prepare, payload, route)),
            )
        )
        prepared = service.prepare(payload, route)
        body = partial(prepared.body_for, payload, route.targets[0])
        rows.append((f"{label}: body for vLLM", per_call_us(body)))
    return rows


def _prepare_cold(cfg: Any, route: Any, schema: dict[str, Any], counter: Any) -> None:
    """A schema never seen before: a fresh title each call, a fresh service."""
    fresh = {**schema, "title": f"t{next(counter)}"}
    payload = {"model": "m", "messages": [], "response_format": _rf(fresh)}
    StructuredService(cfg.routes).prepare(payload, route)


def _no_schema(_i: int) -> dict[str, Any]:
    return {}


def _cold(schema: dict[str, Any], i: int) -> dict[str, Any]:
    return {"response_format": _rf({**schema, "title": f"cold-{i}-{time.time_ns()}"})}


def _warm(extra: dict[str, Any], _i: int) -> dict[str, Any]:
    return extra


_FIRST_TOKEN = re.compile(rb'"content":"[^"]')


def _rf(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


async def ttft_rows(engine_url: str, model: str, requests: int) -> list[tuple[str, float, float]]:
    import aiohttp

    from tests.support.inprocess_gateway import running_gateway

    config = {
        "engines": [{"name": "v", "kind": "vllm", "url": engine_url, "models": [model]}],
        "routes": [{"model": model, "engines": ["v"]}],
    }
    out = []
    with running_gateway(config) as gw:
        url = f"{gw.base_url}/v1/chat/completions"
        async with aiohttp.ClientSession() as session:

            async def ttft(extra: dict[str, Any]) -> float:
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                    "stream": True,
                    **extra,
                }
                start = time.perf_counter()
                async with session.post(url, json=body) as resp:
                    if resp.status != 200:
                        raise SystemExit(f"HTTP {resp.status}: {await resp.text()}")
                    seen = b""
                    while not _FIRST_TOKEN.search(seen):  # the first non-empty content delta
                        chunk = await resp.content.readany()
                        if not chunk:
                            raise SystemExit("stream ended before any content")
                        seen += chunk
                    elapsed = time.perf_counter() - start
                    await resp.read()
                return elapsed * 1000

            cases: list[tuple[str, Callable[[int], dict[str, Any]]]] = [("no schema", _no_schema)]
            for name, schema in (("typical", TYPICAL), ("large", large_schema()[0])):
                cases.append((f"{name} schema, cold (new each time)", partial(_cold, schema)))
                warm = {"response_format": _rf(schema)}
                cases.append((f"{name} schema, warm (same again)", partial(_warm, warm)))
                await ttft(warm)  # compiled once before the warm samples
            samples: dict[str, list[float]] = {label: [] for label, _ in cases}
            for i in range(requests):  # interleaved, so drift on a busy machine hits all alike
                for label, extra in cases:
                    samples[label].append(await ttft(extra(i)))
            for label, values in samples.items():
                out.append((label, statistics.median(values), max(values)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-url", help="a vLLM server for the TTFT figures")
    parser.add_argument("--model-name", default="tiny")
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print("\nValidation per response (µs, median of 5 runs)")
    for size, how, us in validation_rows():
        print(f"  {size:18s} {how:40s} {'n/a' if us is None else f'{us:10.2f}'}")
    print("\nSchema handling in the gateway per request (µs)")
    for label, us in handling_rows():
        print(f"  {label:34s} {us:10.2f}")
    if args.engine_url:
        print(
            f"\nTime to first token via kiban -> {args.engine_url} ({args.requests} requests, ms)"
        )
        for label, median, worst in asyncio.run(
            ttft_rows(args.engine_url, args.model_name, args.requests)
        ):
            print(f"  {label:38s} median {median:8.1f}   max {worst:8.1f}")


if __name__ == "__main__":
    main()
