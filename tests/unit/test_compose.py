"""`kiban compose`: the README's example and a configuration with every engine kind, checked
against the Compose Specification's schema, the plan, kiban's own config loader and promtool."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kiban.config import load_config, parse_config
from kiban.deploy.compose import render_compose
from kiban.deploy.containers import ContainerError, gateway_config
from kiban.engines import ENGINE_KINDS
from tests.support.deploy_configs import (
    ENV,
    FULL,
    load,
    planned_tail,
    readme_configs,
    write_config,
)
from tests.support.promtool import promtool
from tests.support.schemas import compose_errors


def _render(path: Path, gpu_type: str | None = None):
    cfg, raw, plan = load(path, gpu_type)
    project = render_compose(cfg, raw, path, path.parent / "out", plan)
    # what is on disk is what Docker reads
    document = yaml.safe_load(project.compose_file.read_text())
    assert document == project.document
    return cfg, plan, project, document


def _gateway_config(project):
    """The gateway container's kiban.yaml, loaded by kiban itself."""
    tree = yaml.safe_load((project.root / "gateway" / "kiban.yaml").read_text())
    return tree, parse_config(tree, env={**ENV, "REMOTE_KEY": "r"})


def _ends_with(argv: list[str], tail: list[str]) -> bool:
    return argv[len(argv) - len(tail) :] == tail


def test_the_readme_has_an_example_to_render():
    assert len(readme_configs()) >= 1


@pytest.mark.parametrize("example", readme_configs())
def test_readme_example_validates_and_carries_the_plan(tmp_path, example):
    path = write_config(tmp_path, example)
    cfg, plan, project, document = _render(path, gpu_type="h100-80")
    assert compose_errors(document) == []
    services = document["services"]
    managed = [e for e in cfg.engines if e.launch is not None]
    assert managed
    for engine in managed:
        ep = plan.engine(engine.name)
        service = services[engine.name]
        argv = service["entrypoint"]
        assert ep.flags, "the README's engines are planned"
        assert _ends_with(argv, planned_tail(cfg, plan, engine.name))
        assert argv[argv.index("--host") + 1] == "0.0.0.0"
        assert argv[argv.index("--port") + 1] == str(engine.port)
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [
            {"driver": "nvidia", "device_ids": [str(g) for g in ep.gpus], "capabilities": ["gpu"]}
        ]
        assert service["image"] == ENGINE_KINDS[engine.kind].container_image("gpu").image
        health = service["healthcheck"]["test"]
        assert (
            health[-1]
            == f"http://127.0.0.1:{engine.port}{ENGINE_KINDS[engine.kind].dialect.health_path}"
        )
        assert service["healthcheck"]["start_period"] == f"{engine.launch.ready_timeout_s:g}s"
    _, gateway = _gateway_config(project)
    for engine in managed:
        assert gateway.engine(engine.name).url == f"http://{engine.name}:{engine.port}"
        assert gateway.engine(engine.name).launch is None
    assert gateway.gateway.host == "0.0.0.0"
    published = services["gateway"]["ports"][0]
    assert published["target"] == cfg.gateway.port
    assert published.get("host_ip") == "127.0.0.1"  # the README's gateway.host default


@pytest.fixture
def full(tmp_path, tiny_gguf):
    return _render(write_config(tmp_path, FULL, tiny_gguf))


def test_every_engine_kind_validates_with_its_plan(full):
    cfg, plan, project, document = full
    assert compose_errors(document) == []
    services = document["services"]
    names = {e.name: e.service for e in project.engines}
    assert names["Qwen_SGLang"] == "qwen-sglang"  # a DNS name
    for engine in project.engines:
        service = services[engine.service]
        argv = [a.replace("$$", "$") for a in service["entrypoint"]]
        assert _ends_with(argv, planned_tail(cfg, plan, engine.name))
        ep = plan.engine(engine.name)
        for key, value in ep.env.items():
            assert service["environment"][key] == value
    vllm = services["qwen-vllm"]
    assert "--tensor-parallel-size" in vllm["entrypoint"]
    devices = vllm["deploy"]["resources"]["reservations"]["devices"][0]
    assert devices["device_ids"] == ["0", "1"]
    assert vllm["ipc"] == "host"
    sglang = services["qwen-sglang"]
    assert sglang["ulimits"] == {"memlock": -1, "stack": 67108864}
    assert sglang["entrypoint"][:3] == ["python3", "-m", "sglang.launch_server"]
    # engines sharing GPU 2 start one after the other, in the order the plan assumes
    assert services["qwen-lmdeploy"]["depends_on"] == {
        "qwen-sglang": {"condition": "service_healthy"}
    }
    assert "depends_on" not in sglang
    assert services["qwen-lmdeploy"]["entrypoint"][0] == "lmdeploy"


def test_cpu_engine_runs_its_local_model_from_a_read_only_mount(full):
    cfg, _, _, document = full
    llama = document["services"]["llama-cpu"]
    assert llama["image"].startswith("ghcr.io/ggml-org/llama.cpp:server-b")
    assert llama["entrypoint"][:3] == ["/app/llama-server", "--model", "/models/tiny.gguf"]
    [mount] = llama["volumes"]
    assert mount["source"] == cfg.engine("llama-cpu").launch.model
    assert (mount["target"], mount["read_only"]) == ("/models/tiny.gguf", True)
    assert "deploy" not in llama  # no GPU reservation
    assert llama["environment"]["CUDA_VISIBLE_DEVICES"] == ""


def test_dollars_are_escaped_and_references_kept_for_compose(full):
    _, _, project, document = full
    vllm = document["services"]["qwen-vllm"]
    assert "{{ $$x }} $$(date)" in vllm["entrypoint"]
    env = vllm["environment"]
    assert env["PLAIN"] == "a$$b"
    assert env["ENGINE_TOKEN"] == "tok-${ENGINE_SECRET}"  # Compose fills it in
    assert env["HF_TOKEN"] is None  # passed on from the shell
    assert ENV["ENGINE_SECRET"] not in project.compose_file.read_text()


def test_gateway_reaches_engines_by_service_and_the_host_through_host_gateway(full):
    cfg, _, project, document = full
    tree, gateway = _gateway_config(project)
    assert gateway.engine("remote").url == "http://host.docker.internal:9000"
    assert tree["engines"][4]["api_key"] == "${REMOTE_KEY:-none}"  # resolved in the container
    service = document["services"]["gateway"]
    assert service["extra_hosts"] == ["host.docker.internal:host-gateway"]
    assert document["services"]["prometheus"]["extra_hosts"] == service["extra_hosts"]
    assert service["environment"] == {"KIBAN_API_KEY": None, "REMOTE_KEY": None}
    keys = [v for v in service["volumes"] if v["target"] == "/etc/kiban/secrets/api-keys"]
    assert keys[0]["source"] == str(cfg.gateway.api_keys.file)
    assert gateway.gateway.api_keys.file == Path("/etc/kiban/secrets/api-keys")
    assert service["ports"] == [{"target": 8080, "published": "8080", "protocol": "tcp"}]
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    exporter = document["services"]["gpu-exporter"]
    assert exporter["command"][0] == "gpu-exporter"
    reservation = exporter["deploy"]["resources"]["reservations"]["devices"][0]
    assert reservation["count"] == "all"
    assert gateway.observability.gpu_exporter == "standalone"


def test_prometheus_config_passes_promtool_and_scrapes_services(full):
    _, _, project, _ = full
    prom = project.root / "observability" / "prometheus" / "prometheus.yml"
    result = promtool("check", "config", str(prom))
    assert result.returncode == 0, result.stdout + result.stderr
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"][0]
        for job in yaml.safe_load(prom.read_text())["scrape_configs"]
    }
    assert targets["kiban-gateway"] == "gateway:8080"
    assert targets["kiban-gpu"] == "gpu-exporter:9835"
    assert targets["kiban-engine-Qwen_SGLang"] == "qwen-sglang:30000"
    assert targets["kiban-engine-llama-cpu"] == "llama-cpu:8102"


def _refusal(tmp_path: Path, text: str) -> list[str]:
    path = write_config(tmp_path, text)
    cfg, raw, plan = load(path, "h100-80")
    with pytest.raises(ContainerError) as caught:
        render_compose(cfg, raw, path, tmp_path / "out", plan)
    return caught.value.problems


_ONE = """
engines:
  - name: {name}
    kind: {kind}
    models: [m]
    launch: {launch}
routes:
  - model: m
    engines: [{name}]
"""


def test_cpu_only_engine_kinds_say_what_to_do(tmp_path):
    text = _ONE.format(
        name="lm",
        kind="lmdeploy",
        launch="{model: Qwen/Qwen2.5-7B-Instruct, device: cpu, port: 8000}",
    )
    problems = _refusal(tmp_path, text)
    assert any("engine 'lm'" in p and "use launch.device: gpu" in p for p in problems), problems


def test_openai_engine_needs_an_image_and_then_gets_no_guessed_healthcheck(tmp_path):
    launch = "{model: m, device: cpu, port: 8000, command: [srv, --port, '{port}']}"
    problems = _refusal(tmp_path, _ONE.format(name="custom", kind="openai", launch=launch))
    assert any("engine 'custom'" in p and "launch.image" in p for p in problems), problems

    with_image = launch.replace("device: cpu", "device: cpu, image: 'example/srv:1.0'")
    path = write_config(
        tmp_path / "img", _ONE.format(name="custom", kind="openai", launch=with_image)
    )
    _, _, _, document = _render(path, "h100-80")
    service = document["services"]["custom"]
    assert service["image"] == "example/srv:1.0"
    assert service["entrypoint"] == ["srv", "--port", "8000"]
    assert "healthcheck" not in service
    assert compose_errors(document) == []


def test_a_plan_that_does_not_fit_is_refused(tmp_path):
    launch = "{model: Qwen/Qwen2.5-72B-Instruct, port: 8000, context: 131072, concurrency: 64}"
    problems = _refusal(tmp_path, _ONE.format(name="big", kind="vllm", launch=launch))
    assert any(p.startswith("engine big:") and "short by" in p for p in problems), problems


def test_an_engine_may_not_take_the_name_of_a_service_of_kibans(tmp_path):
    launch = "{model: Qwen/Qwen2.5-7B-Instruct, port: 8000}"
    problems = _refusal(tmp_path, _ONE.format(name="Prometheus", kind="vllm", launch=launch))
    assert problems == [
        "engines[0].name: 'Prometheus' becomes service 'prometheus', which is already "
        "kiban's own 'prometheus' service; rename the engine"
    ]


def test_keys_kiban_does_not_rewrite_pass_through_to_the_gateway():
    raw = {
        "gateway": {"port": 8080, "shared_state": {"redis_url": "${REDIS_URL}"}},
        "engines": [{"name": "a", "kind": "vllm", "models": ["m"], "launch": {"model": "x"}}],
        "routes": [{"model": "m", "engines": ["a"]}],
    }
    tree = gateway_config(
        raw, {"a": "http://a:8000"}, loopback_host=None, api_keys_path=None, observability={}
    )
    assert tree["gateway"]["shared_state"] == {"redis_url": "${REDIS_URL}"}
    assert tree["engines"][0] == {
        "name": "a",
        "kind": "vllm",
        "models": ["m"],
        "url": "http://a:8000",
    }
    assert raw["engines"][0]["launch"] == {"model": "x"}  # the caller's tree is left alone


def test_the_schema_check_catches_a_broken_document(full):
    *_, document = full
    document["services"]["qwen-vllm"]["ipcs"] = "host"
    document["services"]["gateway"]["ports"] = "8080"
    errors = compose_errors(document)
    assert any("ipcs" in e for e in errors), errors
    assert any(e.startswith("services/gateway/ports") for e in errors), errors


def test_the_demo_configuration_renders(tmp_path, tiny_model_dir, tiny_gguf):
    """kiban.yaml of this repository: both engines on the CPU from local files.

    The demo's SmolLM2 files are stood in for by the tiny model (same formats, built in seconds).
    """
    text = (Path(__file__).resolve().parents[2] / "kiban.yaml").read_text()
    text = text.replace("./.kiban/models/smollm2-135m-instruct.gguf", str(tiny_gguf))
    text = text.replace("./.kiban/models/smollm2-135m-instruct", str(tiny_model_dir))
    path = write_config(tmp_path, text)
    cfg = load_config(path)
    _, plan, project, document = _render(path)
    assert compose_errors(document) == []
    vllm = document["services"]["vllm-cpu"]
    assert vllm["image"].startswith("vllm/vllm-openai-cpu:v")
    assert (
        vllm["environment"]["VLLM_CPU_KVCACHE_SPACE"]
        == plan.engine("vllm-cpu").env["VLLM_CPU_KVCACHE_SPACE"]
    )
    assert "gpu-exporter" not in document["services"]  # no engine on a GPU
    assert project.project == "kiban"
    assert cfg.engine("vllm-cpu").launch.device == "cpu"


def test_cli_writes_the_project_and_names_what_it_needs(tmp_path):
    from typer.testing import CliRunner

    from kiban.cli import app

    path = write_config(tmp_path, readme_configs()[0])
    out = tmp_path / "project"
    args = ["compose", "-c", str(path), "-o", str(out), "--gpu", "h100-80"]
    result = CliRunner().invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'compose.yaml'} (project kiban)" in result.output
    assert "qwen-vllm: vllm/vllm-openai:v" in result.output
    assert "KIBAN_API_KEY" in result.output
    assert compose_errors(yaml.safe_load((out / "compose.yaml").read_text())) == []
    # without GPUs to plan on, the plan's problem says how to name them
    result = CliRunner().invoke(app, ["compose", "-c", str(path), "-o", str(tmp_path / "x")])
    if result.exit_code == 0:
        pytest.skip("NVML sees GPUs on this machine")
    assert result.exit_code == 1
    assert "--gpu / --gpu-memory" in result.output
    assert not (tmp_path / "x").exists()


def test_the_metrics_key_is_mounted_into_prometheus(tmp_path, tiny_gguf):
    """observability.metrics_key_file: Prometheus reads /admin/metrics with it, in the project."""
    (tmp_path / "prometheus.key").write_text("sk-kiban-admin\n")
    text = "observability: {metrics_key_file: prometheus.key}\n" + FULL
    _, _, project, document = _render(write_config(tmp_path, text, tiny_gguf))
    assert compose_errors(document) == []
    mounts = document["services"]["prometheus"]["volumes"]
    assert {
        "type": "bind",
        "source": str(tmp_path / "prometheus.key"),
        "target": "/etc/prometheus-keys/metrics.key",
        "read_only": True,
    } in mounts
    prom = project.root / "observability" / "prometheus" / "prometheus.yml"
    jobs = {j["job_name"]: j for j in yaml.safe_load(prom.read_text())["scrape_configs"]}
    keys_job = jobs["kiban-gateway-keys"]
    assert keys_job["static_configs"][0]["targets"] == ["gateway:8080"]
    assert keys_job["authorization"]["credentials_file"] == "/etc/prometheus-keys/metrics.key"
    gateway_tree, _ = _gateway_config(project)
    assert gateway_tree["observability"]["metrics_key_file"] is None
