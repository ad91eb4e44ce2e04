"""A new engine kind is one module's worth of parts plus one registry entry.

The kind here lives in this test only: an OpenAI-compatible dialect that carries a
JSON schema in a field of its own (``toy_schema``), and a KV layout with one dtype.
Registered under the name ``toy``, a configuration can name it; the gateway routes a
chat request to an engine of that kind (tests/support/fault_upstream.py, which echoes
the body it received), and ``kiban plan`` and ``kiban plan model`` size it. Nothing in
kiban outside the registry learns of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kiban.cli.app import app
from kiban.config import EngineConfig
from kiban.engines import ENGINE_KINDS
from kiban.engines.dialect import Dialect
from kiban.engines.kind import EngineKind
from kiban.engines.kv_layout import KvLayout
from kiban.planning.quick import capacity_columns
from kiban.sizing.kv import KvFormat, plain
from kiban.sizing.specs import ModelSpec
from kiban.sizing.target import PlanRefusal, PlanTarget
from kiban.structured.capability import StructuredCapability
from kiban.structured.constraint import Constraint
from tests.support.engines import EngineProcess
from tests.support.gateway import chat_exchange, fault_upstream
from tests.support.inprocess_gateway import running_gateway

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


class ToyDialect(Dialect):
    """OpenAI's routes; a JSON schema goes in ``toy_schema``, not ``response_format``."""

    def structured_capability(self, config: EngineConfig) -> StructuredCapability:
        kinds = frozenset({"json_schema"})
        return StructuredCapability(enforced=kinds, expressible=kinds, describes="toy")

    def structured_fields(self, constraint: Constraint, config: EngineConfig) -> dict[str, Any]:
        return {"toy_schema": constraint.schema}


class ToyKv(KvLayout):
    """f16 K and V, 32-token blocks."""

    kv_dtypes = ("f16",)
    capacity_dtypes = ("f16",)

    def kv_formats(
        self, kv_dtype: str, spec: ModelSpec, target: PlanTarget
    ) -> tuple[KvFormat, KvFormat]:
        if kv_dtype not in ("auto", "f16"):
            raise PlanRefusal(f"toy has no KV cache dtype {kv_dtype!r}", self.kv_dtypes)
        fmt = plain("f16", 16)
        return fmt, fmt

    def kv_block_tokens(self, target: PlanTarget) -> int:
        return 32

    def plan_flags(self, plan) -> list[str]:
        return ["--toy-context", str(plan.context), "--toy-slots", str(plan.concurrency)]


TOY = EngineKind(name="toy", dialect=ToyDialect(), kv=ToyKv())


@pytest.fixture
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ENGINE_KINDS, TOY.name, TOY)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    process = fault_upstream(tmp_path_factory.mktemp("toy")).start()
    try:
        yield process
    finally:
        process.stop()


def _config(url: str) -> dict[str, Any]:
    return {
        "engines": [
            {
                "name": "t",
                "kind": "toy",
                "url": url,
                "models": ["ok"],
                "launch": {"model": MODEL, "port": int(url.rsplit(":", 1)[1]), "context": 4096},
            }
        ],
        "routes": [{"model": "ok", "engines": ["t"]}],
    }


def test_the_gateway_routes_to_a_registered_kind_in_its_dialect(toy_registered, upstream) -> None:
    schema = {"type": "object"}
    body = {
        "model": "ok",
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "any", "schema": schema, "strict": True},
        },
    }
    with running_gateway(_config(upstream.base_url)) as gateway:
        status, headers, answer = chat_exchange(gateway.base_url, body)
    assert status == 200, answer
    received = json.loads(answer["choices"][0]["message"]["content"])["body"]
    assert received["toy_schema"] == schema  # the toy dialect's field ...
    assert "response_format" not in received  # ... in place of OpenAI's
    assert headers["x-kiban-structured"]  # the gateway treated the schema as enforced


def test_kiban_plan_sizes_a_registered_kind(toy_registered, tmp_path) -> None:
    config = tmp_path / "kiban.yaml"
    config.write_text(yaml.safe_dump(_config("http://127.0.0.1:8011")))
    result = CliRunner().invoke(app, ["plan", "-c", str(config), "--gpu", "rtx4090", "--json"])
    assert result.exit_code == 0, result.output
    (plan,) = json.loads(result.output)["engines"]
    assert plan["kind"] == "toy" and plan["context"] == 4096
    assert plan["flags"][:2] == ["--toy-context", "4096"]
    assert ("toy", "f16") in capacity_columns()
    result = CliRunner().invoke(app, ["plan", "model", MODEL, "--gpu", "rtx4090", "--json"])
    assert result.exit_code == 0, result.output
    model = json.loads(result.output)
    (row,) = [r for r in model["kv"] if r["kind"] == "toy"]
    assert row["bytes_per_token"] > 0
    assert model["capacity"]["rtx4090"]["toy:f16"]["kv_tokens"] > 0
