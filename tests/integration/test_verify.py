"""`verify`: Stripe's own totals read back and compared with the ledger and OpenMeter."""

from __future__ import annotations

from datetime import timedelta

import stripe
from freezegun import freeze_time

from reconciler.clock import utc_now
from reconciler.upstream.openmeter_api import OpenMeterGateway
from reconciler.verify import Verifier, classify
from tests.conftest import STRIPE_KEY, ts, utc
from tests.integration.test_usage_sync import MID, PERIOD_END, seed, use


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
        assert findings(h) == [("cus_A", "ok"), ("cus_B", "ok"), ("cus_L", "ok")]
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
    assert classify(reported=5, stripe=5, measured=9, is_final=True, last_event_at=None, now=now)[0] == "late_drift"
    assert classify(reported=5, stripe=5, measured=9, is_final=False, last_event_at=None, now=now)[0] == "ok"
    recent = now - timedelta(minutes=1)
    assert classify(reported=5, stripe=3, measured=5, is_final=False, last_event_at=recent, now=now)[0] == "settling"
    assert classify(reported=5, stripe=None, measured=5, is_final=False, last_event_at=None, now=now)[0] == (
        "unverifiable"
    )
