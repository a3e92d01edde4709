"""The HTML report as a billing engineer opens it: made by `reconciler report --format html` after a real usage
sync and balance reconciliation against the seeded sandbox, shown by headless Chromium at 1280 px, its layout
checked in the DOM (what a person would see, not the markup's text)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from reconciler.balances.money import to_units
from reconciler.clock import utc_now
from reconciler_sandbox.seed import DEMO_METERS, seed_sandbox
from tests.integration.helpers import reconciler, write_config

SECTIONS = ("totals", "usage-chart", "drift-chart", "attention", "drift", "unbilled", "periods", "audit")
CUSTOMER_SECTIONS = ("attention", "drift", "unbilled", "periods", "audit")
SHOWN_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC")


def first_existing(*candidates: str | None) -> str | None:
    return next((c for c in candidates if c and os.path.exists(c)), None)


@pytest.fixture
def browser() -> Iterator[object]:
    chromium = first_existing("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
    driver_path = first_existing("/usr/bin/chromedriver", shutil.which("chromedriver"))
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if not (chromium and driver_path):
        reason = "needs selenium, Chromium and chromedriver (Debian packages chromium and chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: {reason}")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def sandbox_report(sandbox, tmp_path) -> tuple[Path, dict]:
    """The seeded sandbox synced for real: globex's storage item left out of usage.meters (an item nobody bills),
    acme's balance drifting past max_auto_correction (a person must look), initech's corrected in Moesif."""
    seed_sandbox(sandbox.stripe, sandbox.openmeter, sandbox.moesif, utc_now())
    meters = [m for m in DEMO_METERS if m["stripe"] != "storage_gb"]
    raw = sandbox.config_dict(f"sqlite:///{tmp_path / 'ledger.db'}", meters=meters)
    config = write_config(tmp_path / "config.yaml", {**raw, "server": {"port": 0, "ops_port": 0}})
    for command in (["db", "upgrade"], ["sync-usage"], ["reconcile-balances"], ["reconcile-balances"]):
        done = reconciler(*command, "--config", str(config))
        assert done.returncode == 0, done.stdout + done.stderr
    page = tmp_path / "report.html"
    made = reconciler("report", "--format", "html", "--output", str(page), "--config", str(config))
    assert made.returncode == 0, made.stderr
    data = json.loads(reconciler("report", "--format", "json", "--config", str(config)).stdout)
    # What the page must show is really there: drift, an unbilled item, something for a person, Moesif writes.
    assert any(d["difference_minor"] for d in data["balance_drift"]) and data["unbilled"] and data["attention"]
    assert any(a["system"] == "moesif" for a in data["audit"])
    return page, data


LAYOUT = """
const doc = document.documentElement;
document.querySelectorAll('details').forEach(d => d.open = true);  // the history, unfolded, must fit too
const visible = el => !!el && el.getClientRects().length > 0 && getComputedStyle(el).visibility !== 'hidden';
const text = el => el ? el.innerText : null;
const outer = id => [...document.querySelectorAll(`#${id} table`)].filter(t => !t.parentElement.closest('table'));
const charts = [...document.querySelectorAll('#usage-chart svg, #drift-chart svg')].map(svg => ({
  section: svg.closest('section').id,
  yTicks: [...svg.querySelectorAll('.y-axis text')].map(t => t.textContent.trim()),
  xLabels: [...svg.querySelectorAll('.x-axis text')].map(t => t.textContent.trim()),
  axisLines: svg.querySelectorAll('.y-axis line.axis, .x-axis line.axis').length,
  legend: [...svg.querySelectorAll('.legend text')].map(t => t.textContent.trim()),
}));
return {
  scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth,
  sections: Object.fromEntries(arguments[0].map(id => [id, visible(document.getElementById(id))])),
  firstHeaders: Object.fromEntries(arguments[1].map(id => [id,
    outer(id).map(t => t.querySelector('thead th') && t.querySelector('thead th').innerText.trim())])),
  driftHeaders: [...document.querySelectorAll('#drift thead th')].map(th => th.innerText.trim()),
  // rows of the drift table itself (not a folded history, not the row that holds one)
  driftCustomers: outer('drift').flatMap(t => [...t.tBodies].flatMap(b => [...b.rows]))
    .filter(tr => tr.cells.length > 1).map(tr => tr.cells[0].innerText.trim()),
  histories: document.querySelectorAll('#drift details summary').length,
  charts,
  times: [...document.querySelectorAll('time')].map(t => t.innerText.trim()),
  body: document.body.innerText,
  sectionText: Object.fromEntries(arguments[0].map(id => [id, text(document.getElementById(id))])),
};
"""


def test_the_sandbox_report_reads_well_in_a_browser_at_1280_px(browser, sandbox_report, tmp_path):
    page, data = sandbox_report
    browser.get(page.as_uri())
    facts = browser.execute_script(LAYOUT, list(SECTIONS), list(CUSTOMER_SECTIONS))
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(height + 200, 8000))  # the whole page, for a person to look at
    browser.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000

    assert facts["scrollWidth"] <= facts["clientWidth"], "the page scrolls sideways at 1280 px"
    assert facts["sections"] == dict.fromkeys(SECTIONS, True)

    for section, headers in facts["firstHeaders"].items():
        assert headers and all(h.lower() == "customer" for h in headers), (section, headers)

    # Balance drift: one row per customer (the latest comparison), the balances side by side, history folded.
    customers = {d["customer"] for d in data["balance_drift"]}
    assert sorted(facts["driftCustomers"]) == sorted(customers)
    assert facts["histories"] == len(customers)
    assert {"Stripe expected", "Moesif", "Difference"} <= set(facts["driftHeaders"])
    latest = {d["customer"]: d for d in data["balance_drift"]}  # oldest first: the last one is the latest
    for customer, row in latest.items():
        shown = f"{to_units(row['difference_minor'], row['currency']):+,} {row['currency'].upper()}"
        assert shown in facts["sectionText"]["drift"], (customer, shown)

    # Money in currency units with its currency, never minor units.
    assert "minor" not in facts["body"].lower()
    for write in (a for a in data["audit"] if a["system"] == "moesif"):
        kind, minor, currency = re.fullmatch(r"(\w+) (\d+) (\w+) minor units", write["amount"]).groups()
        assert f"{kind} {to_units(int(minor), currency):,} {currency.upper()}" in facts["sectionText"]["audit"]

    # Totals: a readable summary, with the balance drift and what needs a person.
    totals = facts["sectionText"]["totals"]
    assert not re.search(r"\b[a-z]+_[a-z_]+\b", totals), totals
    drifting = [d for d in latest.values() if d["difference_minor"]]
    absolute = sum((abs(to_units(d["difference_minor"], d["currency"])) for d in drifting), Decimal(0))
    assert f"{absolute:,} USD" in totals
    assert re.search(rf"needing a person\s*{len(data['attention'])}\b", totals, re.IGNORECASE), totals
    assert re.search(rf"balance drift\s*{len(drifting)} of {len(latest)}\b", totals, re.IGNORECASE), totals

    # Charts: both drawn (there is usage and drift), with axis values, labels and a legend.
    assert sorted(c["section"] for c in facts["charts"]) == ["drift-chart", "usage-chart"]
    for chart in facts["charts"]:
        numbers = [t for t in chart["yTicks"] if re.fullmatch(r"[\d,.]+", t)]
        assert len(numbers) >= 3 and numbers[0] == "0", chart
        assert chart["axisLines"] == 2 and any(chart["xLabels"]) and len(chart["legend"]) >= 2, chart

    # Times as `2026-12-01 13:40 UTC`, none as ISO 8601 with offsets and microseconds.
    assert facts["times"] and all(SHOWN_TIME.fullmatch(t) for t in facts["times"]), facts["times"]
    assert not re.search(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}|\+00:00", facts["body"])
