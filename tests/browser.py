"""A real headless Chromium for the dashboard tests: Debian's `chromium` and `chromium-driver`,
driven by Selenium. Nothing is fetched from the network: the driver's path is given (so Selenium
Manager never runs) and the browser's background services are off."""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

from services import require

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--hide-scrollbars")


@contextmanager
def chromium(width: int = 1280, height: int = 800, *flags: str) -> Iterator[WebDriver]:
    browser, driver = require("chromium"), require("chromedriver", "chromium-driver")
    with tempfile.TemporaryDirectory(prefix="ollama-metrics-chromium-") as profile:
        options = Options()
        options.binary_location = browser
        for flag in (*FLAGS, *flags):
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        chrome = webdriver.Chrome(options=options, service=Service(driver))
        try:
            yield chrome
        finally:
            chrome.quit()


def console_errors(driver: WebDriver) -> list[dict[str, Any]]:
    """The browser console's SEVERE entries since the last call (reading clears them)."""
    log = driver.get_log("browser")  # type: ignore[no-untyped-call]  # untyped in Selenium
    return [entry for entry in log if entry["level"] == "SEVERE"]


def viewport(driver: WebDriver, width: int, height: int) -> None:
    """Make the page's viewport exactly width x height CSS pixels (the window's size includes
    the browser's own frame)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


def screenshot(driver: WebDriver, name: str, full_page: bool = True) -> Path:
    """A PNG of the page (all of it, or what the viewport shows) in test-artifacts/."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    shot: dict[str, Any] = {"format": "png"}
    if full_page:
        size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot.update(captureBeyondViewport=True, clip={
            "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
    data = driver.execute_cdp_cmd("Page.captureScreenshot", shot)["data"]
    path.write_bytes(base64.b64decode(data))
    return path
