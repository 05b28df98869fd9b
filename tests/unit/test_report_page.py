"""The report page in a real headless Chromium (Debian's chromium and chromium-driver): it
renders offline, every chart has data drawn, and the console stays free of errors."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachesync.consumers.ops.effectiveness.cost import IssuedPurge, TierLog, invalidation_cost
from cachesync.consumers.ops.effectiveness.gather import RatioPoint, ReportData
from cachesync.consumers.ops.effectiveness.page import render
from cachesync.consumers.ops.effectiveness.store import Outcome

REGIONS = ("us-east", "eu-west", "ap-southeast")
T0 = 1_796_000_000_000


def report_data() -> ReportData:
    """Ten minutes of three regions: steady hit ratios, a purge burst at minute 6 and its misses."""
    rng = random.Random(7)
    data = ReportData(T0, T0 + 600_000, window_s=10)
    for step in range(120):
        at = T0 + (step + 1) * 5_000
        burst = 72 <= step < 78
        for region in REGIONS:
            for tier, base in (("redis", 0.8), ("varnish", 0.93), ("cloudflare", 0.88)):
                ratio = base - (0.3 if burst else 0.0) + rng.uniform(-0.03, 0.03)
                data.ratios.append(
                    RatioPoint(at, region, tier, 100 * ratio, 100 * (1 - ratio), region)
                )
        if step % 12 == 0:
            data.ratios.append(RatioPoint(at, "eu-west", "cloudfront", 90.0, 10.0, "E1"))
    outcomes: list[Outcome] = []
    for n in range(40):
        at = T0 + 360_000 + n * 1_000 if n < 30 else T0 + 60_000 * (n - 29)
        event_type = "vendor.updated" if n % 2 else "photo.uploaded"
        page = f"/weddings/w{n}/gallery"
        data.purges += [
            IssuedPurge(at, f"e{n}", event_type, region, urls=(page,)) for region in REGIONS
        ]
        outcomes += [
            Outcome(at + 300, page, "miss", "warmer"),
            Outcome(at + 800, page, "hit", "guest"),
            Outcome(at + 900, page, "hit", "guest"),
        ]
        if n % 3 == 0:
            outcomes.append(Outcome(at + 200, page, "miss", "guest"))
    data.costs = invalidation_cost(
        data.purges, [TierLog("varnish", "edge", REGIONS, outcomes)], window_s=10
    )
    data.latency_ms = {
        (region, sink): [rng.lognormvariate(4, 0.6) for _ in range(200)]
        for region in REGIONS
        for sink in ("redis", "http_purge", "cloudflare", "warmer")
    }
    data.consistency = {(region, "redis"): (500, 499) for region in REGIONS} | {
        (region, "http_purge"): (200, 200) for region in REGIONS
    }
    return data


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    assert chromium and driver_path, (
        "Chromium is missing: make setup (deploy/local/install.sh) installs Debian's "
        "chromium and chromium-driver"
    )
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,5200"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(browser: Any, page: Path) -> list[dict[str, Any]]:
    """Load the page and wait until plotly has drawn every chart; what each chart holds."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page.as_uri())
    WebDriverWait(browser, 60).until(
        lambda d: d.execute_script(
            "const c = document.querySelectorAll('.js-plotly-plot');"
            "return c.length > 0 && Array.from(c).every(el => el._fullLayout);"
        )
    )
    charts: list[dict[str, Any]] = browser.execute_script(
        """
        return Array.from(document.querySelectorAll('.chart')).map(box => {
          const el = box.querySelector('.js-plotly-plot');
          return {
            name: box.dataset.chart,
            values: el.data.reduce((n, t) => n + (t.y || t.x || []).filter(
              v => v !== null && v !== undefined).length, 0),
            drawn: el.querySelectorAll(
              '.scatterlayer .point, .scatterlayer .js-line, .barlayer .point, .boxlayer .box'
            ).length,
          };
        });
        """
    )
    return charts


def test_the_report_renders_offline_with_data_in_every_chart(browser: Any, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render(report_data()), encoding="utf-8")
    browser.get_log("browser")  # start from an empty console
    charts = open_page(browser, page)
    assert {c["name"] for c in charts} == {"hit-ratio", "latency", "cost", "warming", "nines"}
    for chart in charts:
        assert chart["values"] > 0, chart
        assert chart["drawn"] > 0, chart
    # Self-contained: nothing was fetched, from a CDN or anywhere else.
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    text = browser.find_element("tag name", "body").text
    assert "vendor.updated" in text and "warming saved" in text


def test_a_page_that_loads_a_script_from_a_cdn_is_caught(browser: Any, tmp_path: Path) -> None:
    """The negative control: a page fetching plotly from outside fails the offline checks."""
    page = tmp_path / "cdn.html"
    page.write_text(
        '<html><head><script src="https://cdn.invalid/plotly.min.js"></script></head>'
        "<body><div class='chart' data-chart='x'></div></body></html>"
    )
    browser.get_log("browser")
    browser.get(page.as_uri())
    fetched = browser.execute_script("return performance.getEntriesByType('resource').length")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert fetched > 0 or errors, "a page loading an outside script went unnoticed"
