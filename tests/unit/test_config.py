"""kiban.yaml validation: every error names the key path, the bad value and what is accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiban.config import ConfigError, load_config, parse_config, resolve_target_model

BASE = {
    "engines": [
        {"name": "a", "kind": "vllm", "url": "http://127.0.0.1:8001", "models": ["qwen"]},
        {"name": "b", "kind": "llamacpp", "url": "http://127.0.0.1:8002/", "models": ["q-gguf"]},
    ],
    "routes": [{"model": "qwen", "aliases": ["default"], "engines": ["a", "b"]}],
}


def _problems(raw: dict, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env or {})
    return info.value.problems


def _with(path: str, value: object) -> dict:
    """BASE with one key replaced, addressed like `engines[0].kind`."""
    import copy

    raw = copy.deepcopy(BASE)
    node: object = raw
    parts = path.replace("]", "").replace("[", ".").split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]  # type: ignore[index]
    last = parts[-1]
    node[int(last) if last.isdigit() else last] = value  # type: ignore[index]
    return raw


def test_valid_config_defaults_and_normalisation() -> None:
    cfg = parse_config(BASE, {})
    assert cfg.engine("b").url == "http://127.0.0.1:8002"  # trailing slash stripped
    route = cfg.routes[0]
    assert route.strategy == "priority" and route.public_names == ["qwen", "default"]
    assert [t.engine for t in route.engines] == ["a", "b"]
    # engine b does not serve "qwen" under that name: its first model is used
    assert resolve_target_model(cfg, route, route.engines[1]) == "q-gguf"
    assert resolve_target_model(cfg, route, route.engines[0]) == "qwen"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("engines[0].kind", "ollama", "engines[0].kind: unknown engine kind; expected one of vllm"),
        ("engines[0].url", "127.0.0.1:8001", "engines[0].url: expected an http:// or https:// URL"),
        ("engines[0].weight", 0, "engines[0].weight: Input should be greater than 0 (got 0)"),
        ("routes[0].strategy", "random", "routes[0].strategy: expected one of priority"),
        ("routes[0].timeouts", {"connect_s": -1}, "routes[0].timeouts.connect_s: Input should be"),
        ("gateway", {"prot": 1}, "gateway.prot: unknown key"),
        (
            "routes[0].timeouts",
            {"first_byte_s": 120},
            "routes[0].timeouts: first_byte_s is no longer a setting: use ttft_s for the first "
            "event of a stream and total_s for a whole answer (got {'first_byte_s': 120})",
        ),
        (
            "routes[0].failover",
            {"context_length": "bigger"},
            "routes[0].failover.context_length: expected one of larger, next or off",
        ),
        ("engines[0].context", 8, "engines[0].context: Input should be greater than or equal"),
    ],
)
def test_errors_name_key_value_and_accepted(path: str, value: object, expected: str) -> None:
    problems = _problems(_with(path, value))
    assert any(p.startswith(expected) for p in problems), problems
    if expected.endswith("expected one of vllm"):
        assert "(got 'ollama')" in problems[0] and "llamacpp" in problems[0]
    if "strategy" in path:
        assert "least_outstanding" in problems[0] and "(got 'random')" in problems[0]


def test_cross_references() -> None:
    raw = _with(
        "routes",
        [
            {"model": "qwen", "engines": ["a", "zz", {"engine": "b", "model": "x"}]},
            {"model": "other", "aliases": ["qwen"], "engines": ["a"]},
        ],
    )
    problems = _problems(raw)
    assert "routes[0].engines[1].engine: unknown engine 'zz'; expected one of a, b" in problems
    assert "routes[0].engines[2].model: engine 'b' does not serve 'x'; it serves q-gguf" in problems
    assert any(
        p.startswith("routes[1].aliases[0]: model name 'qwen' is already served") for p in problems
    )


def test_duplicate_engine_names() -> None:
    raw = _with("engines[1].name", "a")
    assert any("duplicate engine name 'a'" in p for p in _problems(raw))


def test_env_substitution_and_defaults() -> None:
    raw = _with("engines[0].url", "http://${HOST}:${PORT:-9000}")
    cfg = parse_config(raw, {"HOST": "10.0.0.5"})
    assert cfg.engine("a").url == "http://10.0.0.5:9000"
    assert _problems(raw, {}) == ["engines[0].url: environment variable HOST is not set"]


def test_launch_port_gives_url() -> None:
    raw = _with(
        "engines[0]",
        {
            "name": "a",
            "kind": "vllm",
            "models": ["qwen"],
            "launch": {"model": "/m", "port": 8123, "device": "cpu"},
        },
    )
    cfg = parse_config(raw, {})
    assert cfg.engine("a").url == "http://127.0.0.1:8123" and cfg.engine("a").port == 8123


def test_yaml_errors_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("engines: [\n  - name: a\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.problems[0].startswith("line ") and "invalid YAML" in info.value.problems[0]
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "kiban.yaml"
    path.write_text(
        "gateway: {api_keys: {file: keys.txt}}\n"
        "engines:\n"
        "  - {name: a, kind: vllm, models: [m], launch: {model: ../models/m, port: 9001}}\n"
        "  - {name: b, kind: vllm, models: [n], launch: {model: Org/Model-7B, port: 9002}}\n"
        "routes: [{model: m, engines: [a]}, {model: n, engines: [b]}]\n"
    )
    cfg = load_config(path)
    assert cfg.engine("a").launch.model == str(tmp_path / "models" / "m")
    assert cfg.engine("b").launch.model == "Org/Model-7B"  # a hub name stays as it is
    assert cfg.gateway.api_keys.file == tmp_path / "conf" / "keys.txt"


def test_engine_context_and_launch_context_must_agree() -> None:
    raw = _with("engines[0].context", 4096)
    assert parse_config(raw, {}).engine("a").planned_context == 4096
    raw["engines"][0]["launch"] = {"model": "m", "port": 8001, "context": 8192}
    problems = _problems(raw)
    assert problems == [
        "engines[0].context: 4096 differs from launch.context 8192; give one of them"
    ]
    del raw["engines"][0]["context"]
    assert parse_config(raw, {}).engine("a").planned_context == 8192


def test_readme_route_uses_the_default_timeouts_and_failover() -> None:
    """The README's example shows the defaults; they bound what an engine that never
    answers a stream costs (connect within the ttft deadline) to 30 s."""
    import re

    import yaml

    from kiban.config import FailoverPolicy, Timeouts

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    example = re.search(r"## A minimal kiban.yaml\n\n```yaml\n(.*?)```", readme, re.S)
    assert example is not None
    route = yaml.safe_load(example.group(1))["routes"][0]
    assert Timeouts(**route["timeouts"]) == Timeouts()
    assert FailoverPolicy(**route["failover"]) == FailoverPolicy()
    assert Timeouts().ttft_s <= 30
