"""`verify`: Stripe's own totals read back and compared with the ledger and OpenMeter."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import stripe
from freezegun import freeze_time

from reconciler.clock import utc_now
from reconciler.upstream.openmeter_api import OpenMeterGateway
from reconciler.usage.model import SentEvent
from reconciler.usage.stripe_view import attribute_to_period
from reconciler.verify import Verifier, classify
from tests.conftest import STRIPE_KEY, ts, utc
from tests.integration.test_usage_sync import MID, PERIOD_END, PERIOD_START, seed, use


def verifier(h) -> Verifier:
    return Verifier(h.config, h.engine, h.stripe_gateway, OpenMeterGateway(h.config.openmeter), utc_now)


def findings(h) -> list[tuple[str, str]]:
    return [(line.customer, line.finding) for line in verifier(h).run()]


def test_verify_agrees_after_a_cycle_then_flags_another_writer_and_missing_usage(harness):
    h = harness
    seed(h, customer="cus_A")
    seed(h, customer="cus_B")
    seed(h, customer="cus_L", legacy=True, event_name="price_legacy")
    for customer in ("cus_A", "cus_B", "cus_L"):
        use(h, utc(2026, 3, 2), 7, customer=customer)
    with freeze_time(MID) as clock:
        h.cycle()
        # The events are dated in the current minute, which no summary may cover yet (an end_time in the future
        # is never asked for): not yet known, never "missing". Legacy records are read back at once.
        assert findings(h) == [("cus_A", "settling"), ("cus_B", "settling"), ("cus_L", "ok")]
        clock.tick(timedelta(minutes=10))  # past the summaries' consistency window
        assert findings(h) == [("cus_A", "ok"), ("cus_B", "ok"), ("cus_L", "ok")]

        # Another integration writes to the same meter for cus_A; Stripe silently drops one of ours for cus_B.
        client = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": h.stripe_url}, max_network_retries=0)
        client.v1.billing.meter_events.create(
            params={
                "event_name": "api_calls",
                "identifier": "someone-else-1",
                "timestamp": ts(MID - timedelta(days=1)),
                "payload": {"stripe_customer_id": "cus_A", "value": "3"},
            }
        )
        h.stripe.meter_events[:] = [e for e in h.stripe.meter_events if e.customer != "cus_B"]
        lines = {line.customer: line for line in verifier(h).run()}
    assert (lines["cus_A"].finding, lines["cus_A"].stripe, lines["cus_A"].reported) == ("foreign_usage", "10", 7)
    assert (lines["cus_B"].finding, lines["cus_B"].stripe) == ("missing_in_stripe", "0")
    assert lines["cus_L"].finding == "ok" and lines["cus_L"].stripe == "7"


def test_classify_late_drift_and_settling():
    now = PERIOD_END + timedelta(hours=5)
    lag = timedelta(minutes=10)

    def finding(stripe, *, measured=5, is_final=False, last_sent_at=None):
        return classify(
            reported=5,
            stripe=stripe,
            measured=measured,
            is_final=is_final,
            last_sent_at=last_sent_at,
            now=now,
            summary_lag=lag,
        )[0]

    assert finding(5, measured=9, is_final=True) == "late_drift"
    assert finding(5, measured=9) == "ok"
    # Sent 6 minutes ago: within stripe.summary_lag (verify's old fixed window was 5 minutes), not yet known.
    assert finding(3, last_sent_at=now - timedelta(minutes=6)) == "settling"
    assert finding(7, last_sent_at=now - timedelta(minutes=6)) == "settling"
    assert finding(3, last_sent_at=now - lag) == "missing_in_stripe"
    assert finding(None) == "unverifiable"


def test_periods_that_start_mid_minute_are_verified_over_the_same_minutes_stripe_sums(harness):
    """Stripe's summaries take whole minutes. With the anchor at :30 s, the minute a period starts in also holds
    the previous period's final event (dated end - 1 s): that is ours, not another writer's."""
    h = harness
    start, end = PERIOD_START + timedelta(seconds=30), PERIOD_END + timedelta(seconds=30)
    item = seed(h, formula="sum", start=start, end=end)
    use(h, utc(2026, 3, 5), 10)
    with freeze_time(MID) as clock:
        h.cycle()
        clock.move_to(end + timedelta(minutes=31))  # past the grace period: the final sync
        h.stripe.set_item_period(item["id"], ts(end), ts(utc(2026, 5, 1, 13, 45, 30)))
        use(h, utc(2026, 4, 1, 12, 30), 2)  # the old period's last window: its final event, at end - 1 s
        use(h, utc(2026, 4, 1, 13, 10), 5)  # the new period's first hour window
        h.cycle()
        finals = [e for e in h.stripe.meter_events if e.timestamp == ts(end) - 1]
        assert [e.value for e in finals] == [2]  # the boundary minute really holds a final difference
        clock.tick(timedelta(minutes=10))
        lines = verifier(h).run()
    assert [(line.period_start[:19], line.reported, line.stripe, line.finding) for line in lines] == [
        ("2026-03-01T13:45:30", 12, "12", "ok"),
        ("2026-04-01T13:45:30", 5, "5", "ok"),
    ]
    assert "neighbouring period" in lines[1].note


def test_a_summary_is_attributed_to_its_period_by_what_we_sent_into_its_minutes():
    at = PERIOD_END - timedelta(seconds=1)
    previous_final = SentEvent(period_id=1, timestamp=at, value=2, sent_at=None)
    own = SentEvent(period_id=2, timestamp=at + timedelta(seconds=40), value=5, sent_at=None)
    assert attribute_to_period(Decimal(7), "sum", 2, [previous_final, own])[0] == 5
    assert attribute_to_period(Decimal(7), "sum", 2, [own]) == (Decimal(7), "")
    # `last`: the summary is the newest event's value, which shows this period only if that event is its own.
    assert attribute_to_period(Decimal(5), "last", 2, [previous_final, own])[0] == 5
    assert attribute_to_period(Decimal(2), "last", 2, [previous_final])[0] is None
    assert attribute_to_period(Decimal(5), "last", 1, [previous_final, own])[0] is None


def test_a_legacy_period_pages_away_is_still_read_back(harness):
    """Usage record summaries are a list, newest period first, paged (10 to a page unless asked for more): the
    period a read-back or `verify` asks for may be on a later page."""
    h = harness
    item = seed(h, customer="cus_L", legacy=True, event_name="price_legacy")
    subscription = item["subscription"]
    start = PERIOD_END
    for _ in range(120):  # ten years of monthly rollovers: the first period is far down the list
        end = start + timedelta(days=30)
        h.stripe.update_subscription(subscription, current_period_start=ts(start), current_period_end=ts(end))
        start = end
    assert h.stripe_gateway.legacy_usage_total(item["id"], PERIOD_START) == 0
    assert h.stripe_gateway.legacy_usage_total(item["id"], PERIOD_START - timedelta(days=30)) is None
