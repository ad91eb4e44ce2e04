"""Debian's headless chromium driven by selenium through Debian's chromedriver.

One browser at a time (it is heavy on a 2-core machine: run its tests under
the heavy lock), page loads bounded, always quit when the block ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
_ARGS = (
    "--headless=new",
    "--no-sandbox",  # tests run as root in CI
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--window-size=1400,1500",
)


@contextmanager
def headless_chromium(page_load_timeout_s: float = 30.0) -> Iterator[Any]:
    """A selenium WebDriver on headless chromium, quit when the block ends."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), (
        "chromium or chromium-driver is missing: run scripts/bootstrap.sh "
        "(scripts/debian-packages.txt)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in _ARGS:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(page_load_timeout_s)
        yield driver
    finally:
        driver.quit()
