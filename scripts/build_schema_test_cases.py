#!/usr/bin/env python3
"""Build tests/data/schema_test_cases.jsonl.gz: JSON Schemas with instances known to be valid.

Usage (the argument a git checkout of github.com/json-schema-org/JSON-Schema-Test-Suite;
the committed file was built from 44401e0c046704b476ec9d2e2fccdaee618f259d):

    python scripts/build_schema_test_cases.py JSON_SCHEMA_TEST_SUITE

Every test group of ``tests/draft2020-12`` and ``tests/draft7`` (not ``optional``) whose
schema compiles offline with jsonschema-rs, with the instances the suite marks valid
(and jsonschema-rs agrees, asserting formats as kiban does). Each row: ``{"id",
"schema", "valid": [instances]}``. The unit tests check on them that a schema relaxed
for an engine still accepts every valid instance (tests/unit/test_structured_relax.py).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import jsonschema_rs
from build_schema_corpus import commit, load_json

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "schema_test_cases.jsonl.gz"
DRAFTS = ("draft2020-12", "draft7")


def cases(repo: Path) -> list[dict]:
    rows = []
    for draft in DRAFTS:
        for path, groups in load_json(repo, f"tests/{draft}"):
            if "/optional/" in path:
                continue
            for n, group in enumerate(groups):
                schema = group["schema"]
                if isinstance(schema, dict) and draft == "draft7":
                    schema = {"$schema": "http://json-schema.org/draft-07/schema#", **schema}
                try:
                    validator = jsonschema_rs.validator_for(
                        schema, offline=True, validate_formats=True
                    )
                except Exception:
                    continue
                valid = [
                    t["data"]
                    for t in group["tests"]
                    if t["valid"] and validator.is_valid(t["data"])
                ]
                if valid:
                    rows.append({"id": f"{path[6:]}#{n}", "schema": schema, "valid": valid})
    return rows


def main() -> None:
    repo = Path(sys.argv[1])
    rows = cases(repo)
    with gzip.open(OUT, "wt", encoding="utf-8", compresslevel=9) as fh:
        for row in rows:
            fh.write(json.dumps(row, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"{len(rows)} schemas -> {OUT} ({OUT.stat().st_size} bytes)")
    print(f"JSON-Schema-Test-Suite: {commit(repo)}")


if __name__ == "__main__":
    main()
