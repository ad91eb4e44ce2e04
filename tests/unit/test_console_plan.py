"""The console's plan panel: the serving process hands the gateway the planner's view."""

from __future__ import annotations

from kiban.config import parse_config
from kiban.gateway.console_state import _plan
from kiban.gateway.server import build_app
from kiban.planning.plan import plan_view

RAW = {
    "gpus": [{"index": 0, "type": "rtx4090"}],
    "engines": [
        {
            "name": "q",
            "kind": "vllm",
            "models": ["q"],
            "launch": {"port": 8001, "model": "qwen2.5-0.5b", "gpus": [0], "context": 4096},
        }
    ],
    "routes": [{"model": "q", "engines": ["q"]}],
}


def test_the_serving_process_plans_for_the_console() -> None:
    cfg = parse_config(RAW, env={})
    app = build_app(cfg, keys=[])
    assert app.plan_view is plan_view
    shown = _plan(app.plan_view, cfg)
    assert [e["engine"] for e in shown["engines"]] == ["q"], shown
    assert shown["devices"], shown


def test_a_gateway_without_a_planner_says_so() -> None:
    cfg = parse_config(RAW, env={})
    assert _plan(None, cfg) == {
        "engines": [],
        "devices": [],
        "note": "this gateway process has no planner",
    }


def test_no_launch_section_no_plan() -> None:
    raw = {
        "engines": [{"name": "e", "kind": "openai", "url": "http://127.0.0.1:9", "models": ["m"]}],
        "routes": [{"model": "m", "engines": ["e"]}],
    }
    assert plan_view(parse_config(raw, env={}))["note"] == "no engine has a launch section to plan"
