"""Alert and recording rules, checked and unit-tested by the real promtool (Debian package)."""

from __future__ import annotations

from pathlib import Path

import yaml

from kiban.observability.render import ALERT_RULES, DEPLOY_DIR, ENGINE_RULES, engine_rules_text
from tests.support.promtool import promtool

ALERT_TESTS = DEPLOY_DIR / "prometheus" / "tests" / "kiban-alerts.test.yml"


def test_rule_files_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(ALERT_RULES), str(ENGINE_RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_test_where_it_fires() -> None:
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(ALERT_RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts - fired == set(), "alerts without a firing test"
    assert fired - alerts == set(), "tests of alerts that do not exist"
    required = {
        "KibanEngineDown",
        "KibanRouteWithoutHealthyEngine",
        "KibanHighErrorRate",
        "KibanLatencySlo",
        "KibanTimeToFirstTokenSlo",
        "KibanGpuMemoryHigh",
        "KibanKvCacheNearlyFull",
        "KibanEngineQueueGrowing",
        "KibanGpuTemperatureHigh",
        "KibanGpuPolicyViolated",
    }
    assert required <= alerts


def test_checked_in_engine_rules_match_the_engine_kinds() -> None:
    assert ENGINE_RULES.read_text() == engine_rules_text(), (
        "deploy/prometheus/rules/kiban-engines.rules.yml is stale: "
        "run .venv/bin/python -m kiban.observability.render"
    )


def test_a_broken_alert_test_fails(tmp_path: Path) -> None:
    """The promtool run above can fail: the same tests with one expectation changed do."""
    broken = ALERT_TESTS.read_text().replace('summary: "Engine a fails', 'summary: "Engine b fails')
    rules = tmp_path / "rules"
    rules.mkdir()
    for path in (ALERT_RULES, ENGINE_RULES):
        (rules / path.name).write_text(path.read_text())
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / ALERT_TESTS.name).write_text(broken)
    result = promtool("test", "rules", str(tests / ALERT_TESTS.name))
    assert result.returncode != 0
    assert "KibanEngineDown" in result.stdout + result.stderr
