"""`kiban render k8s`: every object validates against Kubernetes' schemas (v1.34, strict) and
prometheus-operator's CRDs, and carries the plan, the probes and the secrets' references."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from kiban.cli import app
from kiban.config import parse_config
from kiban.deploy.containers import ContainerError
from kiban.deploy.k8s import K8sOptions, render_k8s, write_manifests
from kiban.engines import ENGINE_KINDS
from tests.support.deploy_configs import ENV, FULL, load, planned_tail, readme_configs, write_config
from tests.support.schemas import k8s_errors


def _by_kind(objects, kind):
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _container(deployment):
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _in_cluster(text: str) -> str:
    """The README's unmanaged engine at an address a cluster can reach."""
    return text.replace("http://127.0.0.1:8081", "http://llama.inference.svc:8081")


@pytest.mark.parametrize("example", readme_configs())
def test_readme_example_validates_and_carries_the_plan(tmp_path, example):
    path = write_config(tmp_path, _in_cluster(example))
    cfg, raw, plan = load(path, "h100-80")
    manifests = render_k8s(cfg, raw, plan, K8sOptions(namespace="llm"))
    objects = manifests.objects
    for obj in objects:
        assert k8s_errors(obj) == [], (obj["kind"], obj["metadata"]["name"])
        assert obj["metadata"]["namespace"] == "llm"
    deployments = _by_kind(objects, "Deployment")
    for engine in (e for e in cfg.engines if e.launch is not None):
        ep = plan.engine(engine.name)
        name = f"kiban-{engine.name}"
        container = _container(deployments[name])
        assert container["command"][-len(planned_tail(cfg, plan, engine.name)) :] == planned_tail(
            cfg, plan, engine.name
        )
        assert container["resources"]["limits"] == {"nvidia.com/gpu": str(len(ep.gpus))}
        health = ENGINE_KINDS[engine.kind].dialect.health_path
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": health, "port": "http"}
        startup = container["startupProbe"]
        assert (
            startup["periodSeconds"] * startup["failureThreshold"] >= engine.launch.ready_timeout_s
        )
        assert deployments[name]["spec"]["strategy"] == {"type": "Recreate"}
        volumes = {v["name"]: v for v in deployments[name]["spec"]["template"]["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == f"{name}-models"
        assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
        assert _by_kind(objects, "Service")[name]["spec"]["ports"][0]["port"] == engine.port
    gateway = deployments["kiban-gateway"]
    assert gateway["spec"]["replicas"] == 2
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in _container(gateway)["env"]}
    assert env["KIBAN_API_KEY"] == {
        "name": "kiban-secrets",
        "key": "KIBAN_API_KEY",
        "optional": False,
    }
    config_map = _by_kind(objects, "ConfigMap")["kiban-gateway"]
    loaded = parse_config(yaml.safe_load(config_map["data"]["kiban.yaml"]), env=ENV)
    for engine in (e for e in cfg.engines if e.launch is not None):
        assert loaded.engine(engine.name).url == f"http://kiban-{engine.name}:{engine.port}"
    assert loaded.engine("qwen-llama").url == "http://llama.inference.svc:8081"
    monitors = _by_kind(objects, "ServiceMonitor")
    relabel = monitors["kiban-qwen-vllm"]["spec"]["endpoints"][0]["relabelings"]
    assert {
        "action": "replace",
        "targetLabel": "job",
        "replacement": "kiban-engine-qwen-vllm",
    } in relabel
    rules = _by_kind(objects, "PrometheusRule")["kiban-rules"]["spec"]["groups"]
    assert {g["name"] for g in rules} >= {"kiban-engines", "kiban-gateway"}


def test_every_engine_kind_validates(tmp_path):
    text = (
        FULL.replace(
            "  - name: llama-cpu\n    kind: llamacpp\n    models: [tiny]\n    launch: {model: "
            "./tiny.gguf, device: cpu, port: 8102, context: 2048, concurrency: 2}\n",
            "",
        )
        .replace("engines: [llama-cpu]", "engines: [remote]")
        .replace("http://127.0.0.1:9000", "http://models.example.com:9000")
    )
    path = write_config(tmp_path, text)
    cfg, raw, plan = load(path)
    manifests = render_k8s(cfg, raw, plan, K8sOptions(replicas=3, storage_class="fast"))
    for obj in manifests.objects:
        assert k8s_errors(obj) == [], (obj["kind"], obj["metadata"]["name"])
    deployments = _by_kind(manifests.objects, "Deployment")
    vllm = _container(deployments["kiban-qwen-vllm"])
    assert vllm["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert "{{ $x }} $$(date)" in vllm["command"]  # the kubelet leaves it alone
    env = {e["name"]: e for e in vllm["env"]}
    assert env["ENGINE_TOKEN"]["value"] == "tok-$(ENGINE_SECRET)"
    assert env["ENGINE_SECRET"]["valueFrom"]["secretKeyRef"]["optional"] is False
    assert [e["name"] for e in vllm["env"]].index("ENGINE_SECRET") < list(env).index("ENGINE_TOKEN")
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert manifests.secret_keys == {
        "KIBAN_API_KEY": False,
        "REMOTE_KEY": True,
        "api-keys": False,
        "HF_TOKEN": True,
        "ENGINE_SECRET": False,
    }
    claims = _by_kind(manifests.objects, "PersistentVolumeClaim")
    assert claims["kiban-qwen-sglang-models"]["spec"]["storageClassName"] == "fast"
    assert any("shares GPU 2" in n for n in manifests.notes), manifests.notes
    assert any("3 gateway replicas without gateway.shared_state" in n for n in manifests.notes)
    assert "gpu-exporter.yaml" in manifests.files
    [pod_monitor] = _by_kind(manifests.objects, "PodMonitor").values()
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    written = write_manifests(manifests, tmp_path / "k8s")
    assert sorted(p.name for p in written) == [
        "engine-qwen-lmdeploy.yaml",
        "engine-qwen-sglang.yaml",
        "engine-qwen-vllm.yaml",
        "gateway.yaml",
        "gpu-exporter.yaml",
        "monitoring.yaml",
    ]
    reread = [o for p in written for o in yaml.safe_load_all(p.read_text())]
    assert reread == manifests.objects


def test_with_shared_state_there_is_no_warning_about_replicas(tmp_path):
    path = write_config(tmp_path, _in_cluster(readme_configs()[0]))
    cfg, raw, plan = load(path, "h100-80")
    raw["gateway"]["shared_state"] = "${KIBAN_REDIS_URL}"
    manifests = render_k8s(cfg, raw, plan, K8sOptions())
    config = yaml.safe_load(
        _by_kind(manifests.objects, "ConfigMap")["kiban-gateway"]["data"]["kiban.yaml"]
    )
    assert config["gateway"]["shared_state"] == "${KIBAN_REDIS_URL}"
    assert manifests.secret_keys["KIBAN_REDIS_URL"] is False
    assert not any("shared_state" in n for n in manifests.notes)


def test_what_a_cluster_cannot_run_is_refused(tmp_path, tiny_gguf):
    path = write_config(tmp_path, FULL, tiny_gguf)
    cfg, raw, plan = load(path)
    with pytest.raises(ContainerError) as caught:
        render_k8s(cfg, raw, plan, K8sOptions())
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("engine 'llama-cpu': launch.model ")
    assert "a pod cannot mount" in caught.value.problems[0]
    path = write_config(tmp_path / "readme", readme_configs()[0])
    cfg, raw, plan = load(path, "h100-80")
    with pytest.raises(ContainerError) as caught:
        render_k8s(cfg, raw, plan, K8sOptions())
    assert caught.value.problems == [
        "engines[1].url: http://127.0.0.1:8081 is this machine's loopback, which the gateway "
        "cannot reach from the cluster; give an address the cluster reaches, or a launch "
        "section so kiban runs the engine there"
    ]


def test_the_schema_checks_catch_broken_objects(tmp_path):
    path = write_config(tmp_path, _in_cluster(readme_configs()[0]))
    cfg, raw, plan = load(path, "h100-80")
    objects = render_k8s(cfg, raw, plan, K8sOptions()).objects
    deployment = _by_kind(objects, "Deployment")["kiban-qwen-vllm"]
    _container(deployment)["imagePullPolicyy"] = "Always"
    assert k8s_errors(deployment), "an unknown field must fail the strict schema"
    monitor = _by_kind(objects, "ServiceMonitor")["kiban-gateway"]
    monitor["spec"]["endpoints"][0]["relabelling"] = []
    assert any("relabelling" in e for e in k8s_errors(monitor))
    assert k8s_errors({"apiVersion": "example.com/v1", "kind": "Nothing", "metadata": {}})


def test_cli_writes_the_files_and_names_the_secret(tmp_path):
    path = write_config(tmp_path, _in_cluster(readme_configs()[0]))
    out = tmp_path / "k8s"
    result = CliRunner().invoke(
        app, ["render", "k8s", "-c", str(path), "-o", str(out), "--gpu", "h100-80"], env=ENV
    )
    assert result.exit_code == 0, result.output
    assert (
        "kubectl create secret generic kiban-secrets --from-literal=HF_TOKEN=..." in result.output
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "engine-qwen-vllm.yaml",
        "gateway.yaml",
        "gpu-exporter.yaml",
        "monitoring.yaml",
    ]
    bad = CliRunner().invoke(app, ["render", "k8s", "-c", str(path), "--name", "Kiban_X"])
    assert bad.exit_code == 2
    assert "--name 'Kiban_X'" in bad.output


def test_cli_names_the_engine_it_cannot_run(tmp_path):
    path = write_config(tmp_path, readme_configs()[0])
    result = CliRunner().invoke(
        app, ["render", "k8s", "-c", str(path), "-o", str(tmp_path / "k"), "--gpu", "h100-80"]
    )
    assert result.exit_code == 1
    assert "cannot run" in result.output and "engines[1].url" in result.output
    assert not (tmp_path / "k").exists()
