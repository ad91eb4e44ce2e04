#!/usr/bin/env python3
"""Build tests/data/schema_corpus.jsonl.gz: real-world JSON Schemas for the structured-output
end-to-end test, picked deterministically from three public collections.

Usage (each argument a git checkout of the named repository, at any commit):

    python scripts/build_schema_corpus.py JSONSCHEMABENCH TEST_SUITE SCHEMASTORE

- guidance-ai/jsonschemabench  data/<collection>/*.json  (function-call, GitHub, Kubernetes,
  Snowplow, Washington Post schemas)
- json-schema-org/JSON-Schema-Test-Suite  tests/draft2020-12/*.json  (one schema per group)
- SchemaStore/schemastore  src/schemas/json/*.json  (small configuration-file schemas)

Selection: schemas that compile offline with jsonschema-rs (no remote $ref), at most
MAX_BYTES of compact JSON, taken evenly from each collection sorted by file name.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import jsonschema_rs

MAX_BYTES = 4000
OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "schema_corpus.jsonl.gz"
BENCH = {  # collection -> how many
    "Glaiveai2K": 40,
    "Github_easy": 30,
    "Github_medium": 10,
    "Kubernetes": 15,
    "Snowplow": 15,
    "WashingtonPost": 10,
    "JsonSchemaStore": 10,
}
TEST_SUITE = 70
SCHEMASTORE = 60


def git_files(repo: Path, folder: str) -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-tree", "-r", "--name-only", "HEAD", folder],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return sorted(p for p in out.splitlines() if p.endswith(".json"))


def git_read_all(repo: Path, paths: list[str]) -> dict[str, str]:
    """Contents of *paths* at HEAD (one ``git cat-file --batch``); absent blobs are left out."""
    request = "".join(f"HEAD:{p}\n" for p in paths).encode()
    out = subprocess.run(
        ["git", "-C", str(repo), "cat-file", "--batch"], input=request, capture_output=True
    ).stdout
    contents, pos = {}, 0
    for path in paths:
        end = out.index(b"\n", pos)
        header = out[pos:end].split()
        pos = end + 1
        if len(header) == 3 and header[1] == b"blob":
            size = int(header[2])
            contents[path] = out[pos : pos + size].decode("utf-8", "replace")
            pos += size + 1
    return contents


def load_json(repo: Path, folder: str) -> list[tuple[str, object]]:
    files = git_read_all(repo, git_files(repo, folder))
    loaded = []
    for path, text in files.items():
        try:
            loaded.append((path, json.loads(text)))
        except json.JSONDecodeError:
            continue
    return loaded


def commit(repo: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def usable(schema: object, max_bytes: int = MAX_BYTES) -> bool:
    if not isinstance(schema, dict) or not schema:
        return False
    text = json.dumps(schema, separators=(",", ":"))
    if len(text) > max_bytes:
        return False
    try:
        jsonschema_rs.validator_for(schema, offline=True)
    except Exception:
        return False
    return True


def spread(items: list, count: int) -> list:
    """*count* items evenly spaced through *items* (all of them when fewer)."""
    if len(items) <= count:
        return items
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def bench(repo: Path) -> list[dict]:
    rows = []
    for collection, count in BENCH.items():
        candidates = [(p, s) for p, s in load_json(repo, f"data/{collection}") if usable(s)]
        for path, schema in spread(candidates, count):
            rows.append({"id": f"jsonschemabench/{path[5:]}", "schema": schema})
    return rows


def test_suite(repo: Path) -> list[dict]:
    candidates = []
    for path, groups in load_json(repo, "tests/draft2020-12"):
        if "/optional/" in path:
            continue
        for n, group in enumerate(groups):
            schema = group["schema"]
            if usable(schema) and "$id" not in json.dumps(schema):
                candidates.append((f"{path}#{n}", schema))
    return [
        {"id": f"json-schema-test-suite/{p}", "schema": s}
        for p, s in spread(candidates, TEST_SUITE)
    ]


def schemastore(repo: Path) -> list[dict]:
    candidates = [(p, s) for p, s in load_json(repo, "src/schemas/json") if usable(s)]
    return [
        {"id": f"schemastore/{p.rsplit('/', 1)[1]}", "schema": s}
        for p, s in spread(candidates, SCHEMASTORE)
    ]


def main() -> None:
    bench_repo, suite_repo, store_repo = (Path(a) for a in sys.argv[1:4])
    rows = bench(bench_repo) + test_suite(suite_repo) + schemastore(store_repo)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(OUT, "wt", encoding="utf-8", compresslevel=9) as fh:
        for row in rows:
            fh.write(json.dumps(row, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"{len(rows)} schemas -> {OUT} ({OUT.stat().st_size} bytes)")
    for name, repo in (("jsonschemabench", bench_repo), ("test suite", suite_repo)):
        print(f"{name}: {commit(repo)}")
    print(f"schemastore: {commit(store_repo)}")


if __name__ == "__main__":
    main()
