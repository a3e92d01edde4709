"""Unbilled usage is money at risk: metered items the usage sync refuses or cannot map are recorded each full cycle
and `report` puts a figure on them (refused: measured usage at the item's price; unmapped: unknown)."""

from __future__ import annotations

from datetime import timedelta

from freezegun import freeze_time

from reconciler.report import build_report
from tests.conftest import Harness
from tests.integration.helpers import customer_with_usage, reconciler, write_config
from tests.integration.test_usage_sync import MID, PERIOD_START, seed, use


def three_customers(h: Harness) -> None:
    """cus_A billed; cus_B on a `count` meter (refused: no total can be expressed); cus_C on a meter usage.meters
    does not map."""
    seed(h, customer="cus_A")
    seed(h, customer="cus_B", event_name="tokens", formula="count", om_meter="tokens")
    seed(h, customer="cus_C", event_name="other_calls", om_meter="other_calls")
    use(h, PERIOD_START + timedelta(days=1), 7, customer="cus_A")
    use(h, PERIOD_START + timedelta(days=1), 5, customer="cus_B", meter="tokens")
    use(h, PERIOD_START + timedelta(days=1), 9, customer="cus_C", meter="other_calls")


def test_refused_and_unmapped_items_are_counted_in_the_report_with_the_money_at_risk(harness):
    h = harness
    three_customers(h)
    with freeze_time(MID):
        result = h.cycle()
        assert (result.summary.reported, result.summary.failed, result.summary.unmapped) == (1, 1, 1)
        report = build_report(h.engine, MID - timedelta(days=35), MID)
    rows = {u.customer: (u.why, u.measured, u.at_risk, u.currency) for u in report.unbilled}
    # cus_B: 5 tokens at the price's 10 cents; cus_C: nothing says which OpenMeter meter measures it
    assert rows == {"cus_B": ("refused", 5, "0.50", "usd"), "cus_C": ("unmapped", None, None, "usd")}
    totals = report.totals
    assert totals["revenue_at_risk"] == "0.50 usd"
    assert (totals["unbilled_items"], totals["unbilled_items_amount_unknown"]) == (2, 1)


def test_an_item_billed_again_is_forgotten_by_the_next_full_cycle_only(harness):
    h = harness
    three_customers(h)
    with freeze_time(MID) as clock:
        h.cycle()
        h.configure(
            usage={
                "meters": [
                    {"stripe": "api_calls", "openmeter": "api_requests"},
                    {"stripe": "tokens", "openmeter": "tokens"},
                    {"stripe": "other_calls", "openmeter": "other_calls"},
                ]
            }
        )
        clock.tick(timedelta(minutes=15))
        h.cycle(customers=frozenset({"cus_A"}))  # a cycle for one customer says nothing of the others
        assert sorted(u.customer for u in build_report(h.engine, MID - timedelta(days=35), MID).unbilled) == [
            "cus_B",
            "cus_C",
        ]
        clock.tick(timedelta(minutes=15))
        assert h.cycle().summary.unmapped == 0
        left = build_report(h.engine, MID - timedelta(days=35), MID).unbilled
    assert [u.customer for u in left] == ["cus_B"]


def test_sync_usage_fails_on_unmapped_items_when_asked(sandbox, tmp_path):
    customer_with_usage(sandbox, "cus_unmapped")  # on meter api_calls, which this config does not map
    raw = sandbox.config_dict(f"sqlite:///{tmp_path / 'l.db'}", meters=[{"stripe": "nothing", "openmeter": "x"}])
    path = write_config(tmp_path / "config.yaml", raw)
    assert reconciler("db", "upgrade", "--config", str(path)).returncode == 0
    assert reconciler("sync-usage", "--config", str(path)).returncode == 0  # unmapped is skipped, not failed
    strict = reconciler("sync-usage", "--fail-on-unmapped", "--config", str(path))
    assert strict.returncode == 1, strict.stdout + strict.stderr
    report = reconciler("report", "--config", str(path))
    assert "metered items nobody bills" in report.stdout and "unknown" in report.stdout
