"""Extraction with a real model through kiban to llama.cpp: valid, and mostly right.

24 cases of bench/extraction.py (`integration_subset`: the first 8 English cases of
each of its three Pydantic models) go to SmolLM2-135M-Instruct on llama-server in
the two enforced modes, json_schema through kiban and kiban.extract, greedy.

Nothing kiban returns as a success may fail the schema (checked again here with
jsonschema and Pydantic, independently of kiban). The field accuracy must reach
`ACCURACY_FLOOR`. How it is set: the 1st percentile of the field accuracy of 8 English
cases per model drawn at random from a bench/extraction.py run's outcomes (20,000
bootstrap draws, stratified like this subset, per mode, rounded down to a whole percent;
`report` prints it), so that a working set-up falls below it about once in a hundred
random subsets, while a broken conversion, template, tokenizer or schema translation
falls far below.

Measured 2026-12-01 (bench/extraction.py, docs/structured-output.md): json_schema on 32
English cases (this subset and 8 more), 34.0 % of the fields right, bootstrap 1st
percentile 23.9 %; extract on 20 of this subset's 24, 34.9 %, 25.4 %. This subset scores
33.7 % (json_schema) and 34.9 % (extract). Floor: 23 % for both modes. Greedy decoding
makes the fixed subset score about the same on every run; the margin covers the few
tokens that flip between runs on a busy machine.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.engines import EngineProcess
from tests.support.extraction_cases import integration_subset
from tests.support.extraction_run import ExtractionClient, Outcome
from tests.support.inprocess_gateway import running_gateway

pytestmark = pytest.mark.engine

#: per mode, see the module docstring for how they were set
ACCURACY_FLOOR = {"json_schema": 0.23, "extract": 0.23}


@pytest.fixture(scope="module")
def gateway_url(llamacpp_engine_factory, smollm2_gguf: Path):
    engine: EngineProcess = llamacpp_engine_factory(smollm2_gguf, "smollm2", ctx=2048, parallel=1)
    llama = {"name": "l", "kind": "llamacpp", "url": engine.base_url, "models": ["smollm2"]}
    config = {"engines": [llama], "routes": [{"model": "smollm2", "engines": ["l"]}]}
    with running_gateway(config) as gateway:
        yield gateway.base_url


async def _run_all(base_url: str, mode: str) -> list[Outcome]:
    client = ExtractionClient(base_url, "smollm2", "llamacpp", timeout_s=120)
    try:
        return [await client.run(case, mode) for case in integration_subset()]
    finally:
        await client.aclose()


@pytest.mark.parametrize("mode", ["json_schema", "extract"])
def test_extraction_is_valid_and_mostly_right(gateway_url: str, mode: str) -> None:
    outcomes = asyncio.run(_run_all(gateway_url, mode))
    invalid = [o for o in outcomes if o.status in ("parse_failure", "schema_violation")]
    assert invalid == [], "kiban returned invalid output as a success"
    accuracy = sum(o.correct for o in outcomes) / sum(o.fields for o in outcomes)
    errors = [(o.case_id, o.code) for o in outcomes if o.status == "error"]
    print(f"\n{mode}: field accuracy {accuracy:.1%} on {len(outcomes)} cases; errors {errors}")
    assert accuracy >= ACCURACY_FLOOR[mode]
