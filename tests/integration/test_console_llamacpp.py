"""Usage per key, its privacy, and the console in a real browser, in front of a real llama-server.

`kiban serve` (a subprocess) with a keys file of one admin key and one client
key, in front of llama.cpp serving the tiny GGUF. The browser is Debian's
headless chromium driven by selenium through Debian's chromedriver: one
browser, bounded waits, quit in ``finally``. ``KIBAN_SCREENSHOT_DIR`` set
keeps the console's screenshot there (docs/console.png comes from it).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.browser import headless_chromium
from tests.support.engines import EngineProcess
from tests.support.gateway import KIBAN, add_key, gateway_process

pytestmark = pytest.mark.engine

MESSAGES = [{"role": "user", "content": "Say something about licences."}]
WAIT_S = 30.0


@pytest.fixture(scope="module")
def engine(llamacpp_engine_factory, tiny_gguf: Path) -> EngineProcess:
    return llamacpp_engine_factory(tiny_gguf, "tiny", ctx=2048, parallel=2)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("console-keys")
    path = folder / "keys.yaml"
    return {
        "file": path,
        "admin": add_key(path, "ops", "--admin"),
        "alice": add_key(path, "alice"),
        "bob": add_key(path, "bob"),
    }


@pytest.fixture(scope="module")
def gateway(engine, keys, tmp_path_factory: pytest.TempPathFactory):
    config = {
        "gateway": {
            "api_keys": {"file": str(keys["file"])},
            "usage_flush_s": 0.5,
            "health_interval_s": 1,
        },
        "observability": {"gpu_exporter": "off"},
        "engines": [{"name": "llama", "kind": "llamacpp", "url": engine.base_url,
                     "models": ["tiny"]}],
        "routes": [{"model": "tiny", "engines": ["llama"]}],
    }  # fmt: skip
    gw = gateway_process(config, tmp_path_factory.mktemp("console")).start(timeout=60)
    try:
        yield gw
    finally:
        gw.stop()


def _post(base_url: str, key: str, body: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        return resp.status, resp.read()


def _get(url: str, key: str | None = None) -> tuple[int, bytes]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _events(raw: bytes) -> list[dict | str]:
    found: list[dict | str] = []
    for event in raw.split(b"\n\n"):
        data = event.strip().removeprefix(b"data:").strip()
        if data:
            found.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return found


def _usage_rows(keys_file: Path) -> dict[str, dict]:
    done = subprocess.run(
        [str(KIBAN), "keys", "usage", "--file", str(keys_file), "--since", "1d", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    summed: dict[str, dict] = {}
    for row in json.loads(done.stdout):
        cell = summed.setdefault(row["key"], {"requests": 0, "prompt": 0, "completion": 0})
        cell["requests"] += row["requests"]
        cell["prompt"] += row["prompt_tokens"]
        cell["completion"] += row["completion_tokens"]
    return summed


def test_usage_per_key_counts_streams_without_showing_the_extra_event(gateway, keys) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    _, plain = _post(gateway.base_url, keys["bob"], body)
    usage = json.loads(plain)["usage"]
    prompt = usage["prompt_tokens"]

    _, raw = _post(gateway.base_url, keys["bob"], {**body, "stream": True})
    events = _events(raw)
    assert events[-1] == "[DONE]"
    assert all(e["choices"] for e in events[:-1]), "kiban's usage event reached the client"

    _, raw = _post(
        gateway.base_url,
        keys["bob"],
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    asked = _events(raw)
    assert asked[-2]["choices"] == [] and asked[-2]["usage"]["prompt_tokens"] == prompt

    deadline = time.monotonic() + WAIT_S
    while (rows := _usage_rows(keys["file"])).get("bob", {}).get("requests", 0) < 3:
        assert time.monotonic() < deadline, f"usage not flushed to SQLite: {rows}"
        time.sleep(0.5)
    # the engine's own counts for all three, the stream without include_usage included
    assert rows["bob"]["requests"] == 3
    assert rows["bob"]["prompt"] == 3 * prompt
    assert rows["bob"]["completion"] == 3 * usage["completion_tokens"]  # greedy: the same text
    assert "ops" not in rows


def test_per_key_series_need_an_admin_key(gateway, keys) -> None:
    _post(gateway.base_url, keys["alice"], {"model": "tiny", "messages": MESSAGES, "max_tokens": 2})
    status, public = _get(f"{gateway.base_url}/metrics")
    assert status == 200 and b"kiban_requests_total" in public
    assert b"kiban_key_" not in public and b"alice" not in public
    status, private = _get(f"{gateway.base_url}/admin/metrics", keys["admin"])
    assert status == 200
    assert b'kiban_key_tokens_total{key="alice",type="prompt"}' in private
    assert b"kiban_requests_total" not in private
    for path in ("/admin/metrics", "/admin/state"):
        status, body = _get(gateway.base_url + path, keys["alice"])
        assert status == 403 and json.loads(body)["error"]["code"] == "admin_key_required"
        status, body = _get(gateway.base_url + path)
        assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    status, page = _get(f"{gateway.base_url}/console")
    assert status == 200 and b"alice" not in page and b"uplot" in page


def _cells(driver, selector: str) -> list[str] | None:
    """The texts of the first row matching *selector* (the console redraws rows every poll)."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, selector)
    return [td.text for td in rows[0].find_elements(By.TAG_NAME, "td")] if rows else None


def test_console_in_a_real_browser(gateway, keys, tmp_path: Path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with headless_chromium(WAIT_S) as driver:
        wait = WebDriverWait(
            driver, WAIT_S, poll_frequency=0.25, ignored_exceptions=[StaleElementReferenceException]
        )
        driver.get(f"{gateway.base_url}/console")
        driver.find_element(By.ID, "key").send_keys(keys["admin"])
        driver.find_element(By.ID, "open").click()
        cells = wait.until(lambda d: _cells(d, '#engines tr[data-engine="llama"]'))
        assert cells[:2] == ["llama", "llamacpp"] and cells[3] == "up" and cells[4] == "closed"
        routes = driver.find_element(By.ID, "routes").text
        assert "tiny" in routes and "1 of 1 (llama)" in routes
        assert "alice" in driver.find_element(By.ID, "keys").text

        chart = driver.find_element(By.ID, "chart-rps")
        wait.until(lambda d: int(chart.get_attribute("data-points") or 0) >= 1)
        before = float(chart.get_attribute("data-requests"))
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4}
        for i in range(4):  # two streams, for the TTFT chart
            _post(gateway.base_url, keys["alice"], {**body, "stream": i % 2 == 0})
        # the chart's points count the 4 requests (and nothing else reaches this gateway now)
        wait.until(lambda d: float(chart.get_attribute("data-requests")) == before + 4)
        assert float(chart.get_attribute("data-max")) > 0
        assert driver.find_elements(By.CSS_SELECTOR, "#chart-rps canvas")
        wait.until(lambda d: int(_cells(d, '#keys tr[data-key="alice"]')[4]) >= 4)
        if os.environ.get("KIBAN_SCREENSHOT_DIR"):  # for docs: a few more points on the charts
            for i in range(6):
                _post(gateway.base_url, keys["bob"], {**body, "stream": True, "max_tokens": 2 + i})
                time.sleep(1)
            wait.until(lambda d: int(chart.get_attribute("data-points")) >= 8)
        shot = Path(os.environ.get("KIBAN_SCREENSHOT_DIR") or tmp_path) / "console.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(shot))

        driver.find_element(By.ID, "logout").click()
        driver.find_element(By.ID, "key").send_keys(keys["alice"])
        driver.find_element(By.ID, "open").click()
        wait.until(lambda d: "client key" in d.find_element(By.ID, "status").text)
        assert not driver.find_element(By.ID, "board").is_displayed()
