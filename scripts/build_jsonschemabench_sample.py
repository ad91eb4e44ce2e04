#!/usr/bin/env python3
"""Build tests/data/jsonschemabench_sample.jsonl.gz: a seeded random sample of JSONSchemaBench.

Usage (the argument a git checkout of github.com/guidance-ai/jsonschemabench, at any commit;
the committed sample was built from ba103c73756198dd9b149ddc7db7867da7a077f6):

    python scripts/build_jsonschemabench_sample.py JSONSCHEMABENCH

PER_COLLECTION schemas from each of the eight collections the paper's experiments use
(arXiv 2501.10868; GitHub trivial and ultra were left out there too), drawn with
``random.Random(SEED)`` from the schemas that are not already in
tests/data/schema_corpus.jsonl.gz, compile offline with jsonschema-rs (no remote
``$ref``) and take at most MAX_BYTES as compact JSON (the coverage benchmark puts the
schema in the prompt). Each row: ``{"id", "collection", "schema"}``.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

from build_schema_corpus import commit, load_json, usable

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "jsonschemabench_sample.jsonl.gz"
CORPUS = ROOT / "tests" / "data" / "schema_corpus.jsonl.gz"
SEED = 15  # kiban issue 15
PER_COLLECTION = 25
MAX_BYTES = 6000
COLLECTIONS = (
    "Glaiveai2K",
    "Github_easy",
    "Github_medium",
    "Github_hard",
    "Kubernetes",
    "Snowplow",
    "WashingtonPost",
    "JsonSchemaStore",
)


def corpus_ids() -> set[str]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as fh:
        return {json.loads(line)["id"] for line in fh}


def sample(repo: Path) -> list[dict]:
    taken = corpus_ids()
    rng = random.Random(SEED)
    rows = []
    for collection in COLLECTIONS:
        candidates = [
            (path, schema)
            for path, schema in load_json(repo, f"data/{collection}")
            if f"jsonschemabench/{path[5:]}" not in taken and usable(schema, MAX_BYTES)
        ]
        for path, schema in rng.sample(candidates, min(PER_COLLECTION, len(candidates))):
            rows.append(
                {"id": f"jsonschemabench/{path[5:]}", "collection": collection, "schema": schema}
            )
    return rows


def main() -> None:
    repo = Path(sys.argv[1])
    rows = sample(repo)
    with gzip.open(OUT, "wt", encoding="utf-8", compresslevel=9) as fh:
        for row in rows:
            fh.write(json.dumps(row, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"{len(rows)} schemas -> {OUT} ({OUT.stat().st_size} bytes); seed {SEED}")
    print(f"jsonschemabench: {commit(repo)}")


if __name__ == "__main__":
    main()
