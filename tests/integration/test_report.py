"""`report`: the ledger as JSON, CSV and one self-contained HTML file."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from datetime import timedelta
from html.parser import HTMLParser

import pytest
from freezegun import freeze_time

from reconciler.output import rows_csv
from reconciler.report import AuditRow, DriftRow, Report, build_report, exported, render_rows, report_json
from reconciler.report_html import SECTIONS, render_html
from tests.conftest import utc
from tests.integration.test_usage_sync import MID, PERIOD_END, PERIOD_START, seed, use

VOID = {"meta", "br", "img", "input", "link", "hr"}


class TagBalance(HTMLParser):
    """Checks that every element is closed in order (a well-formedness check for our generated HTML)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def reconciled_history(h):
    item = seed(h, formula="sum")
    use(h, utc(2026, 3, 5), 10)
    with freeze_time(MID) as clock:
        h.cycle()
        clock.move_to(PERIOD_END + timedelta(hours=2))
        h.stripe.set_item_period(
            item["id"], int(PERIOD_END.timestamp()), int((PERIOD_END + timedelta(days=30)).timestamp())
        )
        use(h, utc(2026, 3, 20), 4)  # arrives after the invoice finalized: late drift
        h.cycle()
    return build_report(h.engine, PERIOD_START - timedelta(days=1), PERIOD_END + timedelta(days=31))


def test_json_csv_and_html_show_the_same_numbers(harness):
    report = reconciled_history(harness)
    data = json.loads(report_json(report))
    [period] = [p for p in data["periods"] if p["period_start"].startswith("2026-03-01")]
    assert (period["status"], period["measured"], period["reported"], period["difference"]) == ("late drift", 14, 10, 4)
    assert (period["at_risk"], data["totals"]["revenue_at_risk"]) == ("0.40", "0.40 usd")  # 4 units at 10¢
    assert period["stripe"] is None  # `verify` has not read Stripe back yet
    assert data["totals"]["stripe_writes"] == 1 and data["totals"]["unreported"] == 4
    assert [a["request"] for a in data["audit"]] == ["POST /v1/billing/meter_events"]

    rows = list(csv.DictReader(io.StringIO(rows_csv(render_rows(report)))))
    assert [
        (r["status"], r["measured"], r["reported"]) for r in rows if r["period_start"].startswith("2026-03-01")
    ] == [("late drift", "14", "10")]
    audit_rows = list(csv.DictReader(io.StringIO(rows_csv(render_rows(report, audit=True)))))
    assert audit_rows[0]["key"] == data["audit"][0]["key"]

    page = render_html(report)
    checker = TagBalance()
    checker.feed(page)
    assert checker.errors == [] and checker.stack == []
    assert checker.urls == [] and not re.search(r"https?://", page)  # self-contained: nothing to fetch
    assert all(f'<section id="{section}">' in page for section in SECTIONS)
    assert "<dt>Usage not reported</dt><dd>4</dd>" in page and "<dt>Revenue at risk</dt><dd>0.40 USD</dd>" in page
    assert "<dt>Billing periods</dt><dd>2 (1 with late drift, 0 failing)</dd>" in page
    assert page.count("<svg") == 1 and "late drift" in page  # usage drawn; no balance was compared: no drift chart
    assert "No drift" in page


def test_an_empty_window_says_no_usage_and_no_drift_instead_of_empty_charts():
    page = render_html(Report("2026-12-01T00:00:00+00:00", "2026-12-02T13:40:00.123456+00:00"))
    assert "<svg" not in page and "No usage" in page and "No drift" in page
    assert "2026-12-02 13:40 UTC" in page and "+00:00</" not in page
    assert all(f'<section id="{section}">' in page for section in SECTIONS)


@pytest.mark.skipif(
    not (shutil.which("chromium") or shutil.which("chromium-browser")),
    reason="Chromium is not installed (Debian packages chromium and chromium-driver)",
)
def test_a_headless_browser_renders_the_html_report(harness, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render_html(reconciled_history(harness)))
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert shot.stat().st_size > 10_000


def test_the_report_shows_stripes_read_back_once_verify_ran(harness):
    from reconciler.clock import utc_now
    from reconciler.upstream.openmeter_api import OpenMeterGateway
    from reconciler.verify import Verifier

    h = harness
    reconciled_history(h)
    with freeze_time(PERIOD_END + timedelta(hours=3)):
        Verifier(h.config, h.engine, h.stripe_gateway, OpenMeterGateway(h.config.openmeter), utc_now).run()
    report = build_report(h.engine, PERIOD_START - timedelta(days=1), PERIOD_END + timedelta(days=31))
    [period] = [p for p in report.periods if p.period_start.startswith("2026-03-01")]
    assert (period.stripe, period.reported, period.measured) == ("10", 10, 14)


def test_json_and_csv_rows_keep_their_shape_without_the_fields_only_the_page_shows():
    drift = DriftRow("cus_a", "2026-12-01T13:40:00+00:00", "usd", -400, "correct", 1000, 1400, "drift above tolerance")
    audit = AuditRow("t", "moesif", "POST …", "tx", "cus_a", "debit 400 usd minor units", "sent", "debit 4.00 USD")
    assert list(exported(drift)) == ["customer", "observed_at", "currency", "difference_minor", "action"]
    assert list(exported(audit)) == ["time", "system", "request", "key", "customer", "amount", "outcome"]
