"""Scrape configuration, recording rules and the render command, from a kiban.yaml."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from typer.testing import CliRunner

from kiban.cli import app
from kiban.config import parse_config
from kiban.engines import ENGINE_KINDS
from kiban.observability.scrape import (
    GATEWAY_JOB,
    GPU_JOB,
    KEYS_JOB,
    engine_recording_rules,
    rate_window,
    scrape_configs,
)
from tests.support.promtool import promtool

CONFIG = {
    "gateway": {"host": "0.0.0.0", "port": 8080},
    "observability": {"gpu_exporter": "standalone", "gpu_exporter_port": 9835},
    "engines": [
        {
            "name": "big",
            "kind": "vllm",
            "models": ["llama-70b"],
            "launch": {"model": "/models/llama", "gpus": [0, 1], "port": 8001},
        },
        {
            "name": "small",
            "kind": "llamacpp",
            "models": ["qwen-7b"],
            "url": "http://10.0.0.5:8002",
            "api_key": "secret",
            "launch": {"model": "/models/q.gguf", "gpus": [2]},
        },
        {
            "name": "cpu",
            "kind": "sglang",
            "models": ["tiny"],
            "url": "http://127.0.0.1:8003",
            "launch": {"model": "/m", "device": "cpu"},
        },
        {"name": "remote", "kind": "openai", "models": ["gpt"], "url": "https://api.example.com"},
        {"name": "plain", "kind": "lmdeploy", "models": ["x"], "url": "http://127.0.0.1:8004"},
    ],
    "routes": [
        {"model": "llama-70b", "engines": ["big"]},
        {"model": "qwen-7b", "engines": ["small"]},
        {"model": "tiny", "engines": ["cpu"]},
        {"model": "gpt", "engines": ["remote"]},
        {"model": "x", "engines": ["plain"]},
    ],
}


def _jobs(target_host=None) -> dict[str, dict]:
    return {j["job_name"]: j for j in scrape_configs(parse_config(CONFIG), target_host)}


def test_every_engine_with_metrics_gets_a_job_with_consistent_labels() -> None:
    jobs = _jobs()
    assert set(jobs) == {
        GATEWAY_JOB,
        GPU_JOB,
        "kiban-engine-big",
        "kiban-engine-small",
        "kiban-engine-cpu",
        "kiban-engine-plain",
    }  # the generic OpenAI-compatible engine has no known metrics endpoint
    assert jobs[GATEWAY_JOB]["static_configs"][0]["targets"] == ["127.0.0.1:8080"]
    assert jobs[GPU_JOB]["static_configs"][0]["targets"] == ["127.0.0.1:9835"]
    big = jobs["kiban-engine-big"]["static_configs"][0]
    assert big == {
        "targets": ["127.0.0.1:8001"],
        "labels": {"engine": "big", "model": "llama-70b", "kind": "vllm", "gpu": "0,1"},
    }
    small = jobs["kiban-engine-small"]
    assert small["static_configs"][0]["targets"] == ["10.0.0.5:8002"]
    assert small["static_configs"][0]["labels"]["gpu"] == "2"
    assert small["authorization"] == {"type": "Bearer", "credentials": "secret"}
    assert jobs["kiban-engine-cpu"]["static_configs"][0]["labels"]["gpu"] == "cpu"
    assert "gpu" not in jobs["kiban-engine-plain"]["static_configs"][0]["labels"]
    for name, job in jobs.items():
        if name.startswith("kiban-engine-"):
            kind = ENGINE_KINDS[job["static_configs"][0]["labels"]["kind"]]
            assert job["metrics_path"] == kind.metrics.path
            # vLLM's own engine="0" must not shadow kiban's engine label
            relabel = job["metric_relabel_configs"]
            assert relabel[0]["source_labels"] == ["exported_engine"]
            assert relabel[0]["target_label"] == "engine_index"


def test_target_host_replaces_every_host() -> None:
    jobs = _jobs("host.docker.internal")
    targets = [t for j in jobs.values() for sc in j["static_configs"] for t in sc["targets"]]
    assert all(t.startswith("host.docker.internal:") for t in targets)


def test_llamacpp_launch_turns_metrics_on() -> None:
    assert "--metrics" in ENGINE_KINDS["llamacpp"].metrics.launch_args
    assert ENGINE_KINDS["vllm"].metrics.launch_args == ()  # on by default


def test_recording_rules_cover_every_kind_that_names_a_signal() -> None:
    rules = {r["record"]: r["expr"] for r in engine_recording_rules()["groups"][0]["rules"]}
    assert "vllm:kv_cache_usage_perc" in rules["kiban:engine_kv_cache_usage:ratio"]
    assert "llamacpp" not in rules["kiban:engine_kv_cache_usage:ratio"]  # none in llama-server
    assert "llamacpp:requests_deferred" in rules["kiban:engine_requests_waiting"]
    assert (
        "rate(llamacpp:tokens_predicted_total[60s])" in rules["kiban:engine_generation_tokens:rate"]
    )
    assert rate_window(1) == "60s" and rate_window(30) == "120s"


def test_render_writes_a_set_up_prometheus_accepts(tmp_path: Path) -> None:
    cfg_path = tmp_path / "kiban.yaml"
    cfg_path.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "obs"
    result = CliRunner().invoke(
        app, ["observability", "render", "-c", str(cfg_path), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    prom = out / "prometheus" / "prometheus.yml"
    check = promtool("check", "config", str(prom))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "2 rule files found" in check.stdout
    datasource = yaml.safe_load((out / "grafana/provisioning/datasources/kiban.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://127.0.0.1:9090"
    provider = yaml.safe_load((out / "grafana/provisioning/dashboards/kiban.yml").read_text())
    dash_dir = Path(provider["providers"][0]["options"]["path"])
    boards = {json.loads(p.read_text())["uid"] for p in dash_dir.glob("*.json")}
    assert boards == {"kiban-overview", "kiban-engine"}


def test_dashboards_are_valid_grafana_json() -> None:
    root = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
    for path in root.glob("*.json"):
        board = json.loads(path.read_text())
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), path
        names = {v["name"] for v in board["templating"]["list"]}
        assert "datasource" in names
        for panel in board["panels"]:
            assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
                unknown = {v for v in used if not v.startswith("__") and v not in names}
                assert not unknown, (panel["title"], unknown)


def test_per_key_series_are_scraped_with_the_metrics_key_only(tmp_path: Path) -> None:
    """Without a metrics key no job reads /admin/metrics; with one, Prometheus accepts it."""
    assert KEYS_JOB not in _jobs()
    key_file = tmp_path / "admin.key"
    key_file.write_text("sk-kiban-admin\n")
    raw = {**CONFIG, "observability": {"metrics_key_file": "admin.key"}}
    cfg_path = tmp_path / "kiban.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "obs"
    result = CliRunner().invoke(
        app, ["observability", "render", "-c", str(cfg_path), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    prom = out / "prometheus" / "prometheus.yml"
    jobs = {j["job_name"]: j for j in yaml.safe_load(prom.read_text())["scrape_configs"]}
    assert jobs[KEYS_JOB]["metrics_path"] == "/admin/metrics"
    assert jobs[KEYS_JOB]["authorization"] == {
        "type": "Bearer",
        "credentials_file": str(key_file.resolve()),
    }
    assert jobs[KEYS_JOB]["static_configs"] == jobs[GATEWAY_JOB]["static_configs"]
    assert (
        jobs[GATEWAY_JOB]["metrics_path"] == "/metrics" and "authorization" not in jobs[GATEWAY_JOB]
    )
    check = promtool("check", "config", str(prom))
    assert check.returncode == 0, check.stdout + check.stderr
