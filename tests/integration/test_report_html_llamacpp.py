"""`kiban report --html` from a real stack, opened in a real browser.

Debian's Prometheus (own port and data dir) scrapes `kiban serve` and a real
llama-server every second, with the rules `kiban observability render`
writes; a short load runs through the gateway; the report's page is written
and opened from its file in Debian's headless chromium (one browser, bounded
waits, quit in ``finally``). ``KIBAN_SCREENSHOT_DIR`` set keeps the screenshot.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiban.observability.report import Prometheus
from tests.support.browser import headless_chromium
from tests.support.load import background_load
from tests.support.observed_stack import KIBAN, observed_stack

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]

ENGINE = "llama"
WAIT_S = 30.0


@pytest.fixture(scope="module")
def stack(llamacpp_engine_factory, tiny_gguf: Path, tmp_path_factory) -> Iterator[tuple]:
    engine = llamacpp_engine_factory(tiny_gguf, "tiny", ctx=2048, parallel=2)
    root = tmp_path_factory.mktemp("report-html")
    described = {
        "name": ENGINE,
        "kind": "llamacpp",
        "url": engine.base_url,
        "models": ["tiny"],
        "launch": {"model": str(tiny_gguf), "device": "cpu"},
    }
    with observed_stack(root, described, {"gpu_exporter": "off"}) as running:
        yield running.config, running.gateway, Prometheus(running.prometheus.base_url)


def _wait_for(prom: Prometheus, query: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not prom.query(query, time.time()):
        assert time.monotonic() < deadline, f"no result for {query!r} within {WAIT_S} s"
        time.sleep(0.5)


def _chat(base_url: str) -> None:
    body = b'{"model":"tiny","max_tokens":24,"messages":[{"role":"user","content":"hi"}]}'
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 200
        resp.read()


def test_html_report_in_a_real_browser(stack, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    config, gateway, prom = stack
    _wait_for(prom, f'up{{job="kiban-engine-{ENGINE}"}} == 1')
    _wait_for(prom, "kiban:engine_requests_running")
    with background_load(
        lambda: _chat(gateway.base_url), workers=2, max_requests=400, max_seconds=8.0
    ) as load:
        load.run_out()
    assert load.failure_count == 0, load.describe_failures()
    _wait_for(prom, "kiban:engine_generation_tokens:rate > 0")
    time.sleep(3)

    page = tmp_path / "report.html"
    subprocess.run(
        [KIBAN, "report", "-c", str(config), "--period", "5m", "--html", str(page)],
        check=True,
        capture_output=True,
    )
    text = page.read_text()
    assert "CPU engines suffice:" in text and "cdn" not in text.lower()
    assert "<script src" not in text and "<link" not in text  # self-contained

    with headless_chromium(WAIT_S) as driver:
        driver.get(page.as_uri())
        WebDriverWait(driver, WAIT_S).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
        )
        section = driver.find_element(By.CSS_SELECTOR, 'section[data-gpu="cpu"]')
        charts = {
            el.get_attribute("data-chart"): el
            for el in section.find_elements(By.CSS_SELECTOR, "[data-chart]")
        }
        for kind in ("waiting", "tokens"):
            assert charts[kind].get_attribute("data-drawn") == "1", kind
            assert charts[kind].find_elements(By.TAG_NAME, "canvas"), kind
        assert charts["vram"].text == "no data"  # no GPU on this machine
        days = section.find_element(By.CSS_SELECTOR, "table.days tbody").text
        busy = float(days.split()[-1].rstrip("%"))
        assert 0 < busy <= 100, days
        verdict = section.find_element(By.CLASS_NAME, "verdict").text
        assert verdict.startswith("CPU engines suffice:") and "tokens/s at peak" in verdict
        shot = Path(os.environ.get("KIBAN_SCREENSHOT_DIR") or tmp_path) / "report.png"
        assert driver.save_screenshot(str(shot))
